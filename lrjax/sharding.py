"""Device mesh, parameter and batch shardings (multi-process start-up is lrjax.distributed).

The mesh axes (data, fsdp, sequence, tensor), the logical axis names of parameters and activations, and the
rules between them live in lrjax.axes; this module turns them into Meshes, PartitionSpecs and NamedShardings,
and checks up front that a mesh can run a model on a given input.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lrjax import axes

MESH_AXES, BATCH_AXES = axes.MESH_AXES, axes.BATCH_AXES
SEQUENCE_AXIS, TENSOR_AXIS = axes.SEQUENCE_AXIS, axes.TENSOR_AXIS
LOGICAL_RULES = axes.LOGICAL_RULES
LOAD_BALANCE_ORDERS = axes.LOAD_BALANCE_ORDERS


class ShardingError(ValueError):
  """A mesh or sharding that cannot work; the message names the problem."""


# ----------------------------------------------------------------------------------------------------------
# Mesh.


def _as_dict(cfg: Mapping[str, Any] | Any) -> dict:
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    return dict(cfg.to_dict())
  return dict(cfg)


def mesh_shape(mesh_config: Mapping[str, int] | Any, num_devices: int) -> dict[str, int]:
  """Axis sizes {data, fsdp, sequence, tensor} for `num_devices`; one size may be -1 (= the rest).

  Missing axes are 1. Raises ShardingError on unknown axes, non-positive sizes, more than one -1, or sizes
  whose product is not the device count.
  """
  sizes = _as_dict(mesh_config)
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ShardingError(f"unknown mesh axes {unknown}; expected a subset of {list(MESH_AXES)}")
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ShardingError(f"mesh axis sizes must be positive or -1 (the rest), got {bad}")
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ShardingError(f"at most one mesh axis may be -1, got {rest}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % fixed:
      raise ShardingError(f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                          f"{num_devices} devices")
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ShardingError(f"mesh {sizes} has {fixed} devices but {num_devices} are available; make the sizes "
                        f"multiply to {num_devices} or set one axis to -1")
  return sizes


def make_mesh(mesh_config: Mapping[str, int] | Any, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes MESH_AXES from a ConfigDict/mapping of axis sizes (-1 = the rest).

  Args:
    mesh_config: e.g. ConfigDict(dict(data=1, fsdp=-1, sequence=1, tensor=1)).
    devices: the devices to use (default: all of jax.devices(), laid out for the physical topology).
  """
  all_devices = devices is None
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if all_devices:
    try:  # topology-aware order on TPU/GPU; a plain reshape elsewhere
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices, dtype=object).reshape(shape)
  else:
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh | jax.sharding.AbstractMesh, names: str | Sequence[str] | None) -> int:
  """Product of the sizes of `names` (a name, a tuple of names, or None) in `mesh`."""
  if names is None:
    return 1
  if isinstance(names, str):
    names = (names,)
  return math.prod(mesh.shape[a] for a in names)


# ----------------------------------------------------------------------------------------------------------
# Logical rules.


def logical_rules(mesh: Mesh | jax.sharding.AbstractMesh | None = None,
                  rules: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """Rules for flax.linen.logical_axis_rules; mesh axes absent from `mesh` are dropped (when given)."""
  rules = LOGICAL_RULES if rules is None else tuple(rules)
  if mesh is None:
    return tuple(rules)
  present = set(mesh.axis_names)
  out = []
  for name, mesh_axes in rules:
    if mesh_axes is None:
      out.append((name, None))
      continue
    kept = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes) if a in present)
    out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Iterator[Mesh]:
  """Activate `mesh` (jax.set_mesh) and the logical rules, so the model's activation constraints and
  ring attention's shard_map take effect in functions traced inside the block."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(mesh, rules)):
    yield mesh


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] | None = None) -> P:
  """PartitionSpec of an array with logical `axes` under `rules` (flax's priority resolution)."""
  return nn.logical_to_mesh_axes(tuple(axes), logical_rules(mesh, rules))


def path_name(path) -> str:
  """"a/b/c" of a pytree key path (the names PARAM_AXES uses)."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def param_shardings(mesh: Mesh, params: Any, rules: Sequence[tuple[str, Any]] | None = None,
                    param_axes: Mapping[str, tuple] | None = None) -> Any:
  """NamedSharding for every parameter (same pytree structure as `params`).

  Args:
    mesh: the mesh.
    params: the parameter pytree (arrays or jax.ShapeDtypeStruct), paths like "layers/q".
    rules: logical rules (default LOGICAL_RULES).
    param_axes: path -> logical axes (default lrjax.axes.PARAM_AXES).
  Raises:
    ShardingError naming every parameter without logical axes, with the wrong rank, or with a sharded
    dimension that the mesh axes do not divide.
  """
  if param_axes is None:
    param_axes = axes.PARAM_AXES
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  missing, problems, out = [], [], []
  for path, leaf in leaves:
    name = path_name(path)
    logical = param_axes.get(name)
    if logical is None:
      missing.append(name)
      continue
    if len(logical) != len(leaf.shape):
      problems.append(f"{name} has shape {tuple(leaf.shape)} but logical axes {logical}")
      continue
    spec = logical_to_spec(logical, mesh, rules)
    for dim, (size, mesh_axes) in enumerate(zip(leaf.shape, tuple(spec) + (None,) * len(leaf.shape))):
      n = axis_size(mesh, mesh_axes)
      if size % n:
        problems.append(f"{name} dim {dim} ({logical[dim]}) has size {size}, not divisible by mesh axes "
                        f"{mesh_axes} of size {n}")
    out.append(NamedSharding(mesh, spec))
  if missing:
    raise ShardingError(f"parameters without logical axes (add them to lrjax.axes.PARAM_AXES): {missing}")
  if problems:
    raise ShardingError("; ".join(problems))
  return jax.tree_util.tree_unflatten(treedef, out)


def batch_spec(mesh: Mesh | jax.sharding.AbstractMesh, sequence_axis: str = SEQUENCE_AXIS) -> P:
  """PartitionSpec of [b, t] token/position/target arrays: batch over (data, fsdp), length over sequence."""
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  length = sequence_axis if sequence_axis in mesh.axis_names else None
  return P(batch or None, length)


def batch_sharding(mesh: Mesh, sequence_axis: str = SEQUENCE_AXIS) -> NamedSharding:
  """NamedSharding of [b, t] (or [b, t, ...]) data arrays; see batch_spec."""
  return NamedSharding(mesh, batch_spec(mesh, sequence_axis))


def validate(mesh: Mesh, *, batch: int, length: int, config: Any, order: str = "none") -> None:
  """Fail up front, with every problem named, if this mesh cannot run `config` on [batch, length] inputs.

  Args:
    mesh: the mesh.
    batch, length: global batch size and sequence length (tokens per sequence).
    config: an lrjax.model.ModelConfig (heads, kv heads, sizes, attention, sequence_axis).
    order: load-balancing order applied to the data ("none", "zigzag", "striped"); zigzag needs
      length divisible by 2 * sequence.
  Raises:
    ShardingError listing each violated precondition.
  """
  if order not in LOAD_BALANCE_ORDERS:
    raise ShardingError(f"unknown load-balancing order {order!r}; expected one of {LOAD_BALANCE_ORDERS}")
  s = lambda a: mesh.shape.get(a, 1)
  seq_axis = getattr(config, "sequence_axis", SEQUENCE_AXIS)
  problems = []
  n_batch = axis_size(mesh, tuple(a for a in BATCH_AXES if a in mesh.axis_names))
  if batch % n_batch:
    problems.append(f"batch {batch} is not divisible by data*fsdp = {n_batch}")
  n_seq = s(seq_axis)
  if str(getattr(config, "attention", "")).startswith("ring") and seq_axis not in mesh.axis_names:
    problems.append(f"attention='ring' rotates over mesh axis {seq_axis!r}, which the mesh "
                    f"{tuple(mesh.axis_names)} lacks")
  chunks = 2 * n_seq if order == "zigzag" else n_seq
  if length % chunks:
    what = f"2*sequence = {chunks} (zig-zag load balancing)" if order == "zigzag" else f"sequence = {chunks}"
    problems.append(f"length {length} is not divisible by {what}")
  n_tp = s(TENSOR_AXIS)
  for field, label in (("num_heads", "query heads"), ("num_kv_heads", "key/value heads"),
                       ("intermediate_size", "intermediate (mlp) size"), ("vocab_size", "vocab size")):
    value = getattr(config, field, None)
    if value is not None and value % n_tp:
      problems.append(f"{label} {value} is not divisible by tensor = {n_tp}")
  n_embed = s("fsdp") * n_seq
  hidden = getattr(config, "hidden_size", None)
  if hidden is not None and hidden % n_embed:
    problems.append(f"hidden size {hidden} is not divisible by fsdp*sequence = {n_embed} (weights' embed dim)")
  if problems:
    raise ShardingError(f"mesh {dict(mesh.shape)} cannot run this input: " + "; ".join(problems))
