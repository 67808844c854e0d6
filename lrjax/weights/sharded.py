"""HF safetensors checkpoints restored straight into sharded parameters: each process reads only the slices its
devices own (safetensors' lazy get_slice), so peak host memory per process is about its share of the weights.

The parameter shardings are lrjax.sharding's (embed over fsdp x sequence, heads / mlp / vocab over tensor); the
layer axis and head_dim are never split, so every device's piece of a parameter is one contiguous block of rows
and columns of each stored HF tensor (a fused Phi-3 tensor: of its part's rows).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from lrjax import model as model_lib
from lrjax import sharding as sharding_lib
from lrjax.weights import arch, hf
from lrjax.weights.common import WeightsError, dtype_name, np_dtype, read_json


def _files(directory: str) -> dict[str, str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = read_json(index, "safetensors index").get("weight_map") or {}
    return {n: os.path.join(directory, f) for n, f in weight_map.items()}
  single = os.path.join(directory, "model.safetensors")
  if not os.path.exists(single):
    raise WeightsError(f"{directory}: sharded loading reads safetensors (model.safetensors or an index)")
  names, _, _ = hf.weight_sources(directory)
  return {n: single for n in names}


def _span(s: slice, size: int) -> tuple[int, int]:
  start, stop, _ = s.indices(size)
  return start, stop


def _piece(c: model_lib.ModelConfig, key: str, tensor: arch.Tensor, index: tuple, read) -> np.ndarray:
  """Our block `index` (without the layer axis) of `key`, from its HF tensor; read(rows, cols) loads a block."""
  D, H = c.hidden_size, c.head_dim
  offset = 0
  for k in tensor.keys:  # a fused tensor: this key's rows start after the parts before it
    if k == key:
      break
    offset += arch._hf_rows(c, k)
  shape = arch.our_shape(c, key)[1:] if tensor.layer is not None else arch.our_shape(c, key)
  spans = [_span(s, n) for s, n in zip(index, shape)]
  if key in ("layers/q", "layers/k", "layers/v"):       # ours [D, n, H] <- HF rows n*H + h, cols d
    (d0, d1), (n0, n1), _ = spans
    return read((offset + n0 * H, offset + n1 * H), (d0, d1)).T.reshape(d1 - d0, n1 - n0, H)
  if key.endswith("_bias"):                              # ours [n, H] <- HF [n*H]
    (n0, n1), _ = spans
    return read((offset + n0 * H, offset + n1 * H), None).reshape(n1 - n0, H)
  if key == "layers/o":                                  # ours [n, H, D] <- HF [D, n*H]
    (n0, n1), _, (d0, d1) = spans
    return read((d0, d1), (n0 * H, n1 * H)).T.reshape(n1 - n0, H, d1 - d0)
  if key in ("layers/gate", "layers/up"):                # ours [D, F] <- HF rows f (+ offset), cols d
    (d0, d1), (f0, f1) = spans
    return read((offset + f0, offset + f1), (d0, d1)).T
  if key in ("layers/down", "lm_head"):                  # ours [F, D] <- HF [D, F]; lm_head [D, V] <- [V, D]
    (a0, a1), (b0, b1) = spans
    return read((b0, b1), (a0, a1)).T
  if key == "embed":
    (v0, v1), (d0, d1) = spans
    return read((v0, v1), (d0, d1))
  (d0, d1), = spans                                      # norms
  return read((d0, d1), None)


def load_sharded(directory: str | os.PathLike, mesh, *, dtype: str | None = None
                 ) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig, params as global jax.Arrays with lrjax.sharding's parameter shardings on `mesh`)."""
  from safetensors import safe_open
  directory = os.fspath(directory)
  cfg = hf.read_config(directory)
  files = _files(directory)
  table = {k: t for t in arch.hf_table(cfg) for k in t.keys}
  layer_tensors = {}
  for t in arch.hf_table(cfg):
    if t.layer is not None:
      layer_tensors.setdefault(t.keys[0], {})[t.layer] = t
  missing = sorted(t.name for t in arch.hf_table(cfg) if t.name not in files)
  if missing:
    raise WeightsError(f"{directory}: missing tensor {missing[0]}")
  handles: dict[str, object] = {}

  def reader(name):
    path = files[name]
    if path not in handles:
      handles[path] = safe_open(path, framework="numpy")
    lazy = handles[path].get_slice(name)

    def read(rows, cols):
      block = lazy[rows[0]:rows[1]] if cols is None else lazy[rows[0]:rows[1], cols[0]:cols[1]]
      return np.asarray(block)
    return read

  first = handles.setdefault(files[table["embed"].name], safe_open(files[table["embed"].name], framework="numpy"))
  stored = first.get_slice(table["embed"].name).get_dtype()
  target = np_dtype(dtype) or np_dtype({"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored,
                                                                                                    "float32"))
  abstract = arch.nest({k: jax.ShapeDtypeStruct(arch.our_shape(cfg, k), target) for k in arch.param_keys(cfg)})
  shardings = arch.flatten(sharding_lib.param_shardings(mesh, abstract))

  def build(key):
    def shard(index):
      if not key.startswith("layers/"):
        t = table[key]
        return _piece(cfg, key, t, index, reader(t.name)).astype(target)
      layers = range(*index[0].indices(cfg.num_layers))
      owner = lambda l: next(t for t in layer_tensors.values() for t in [t[l]] if key in t.keys)
      return np.stack([_piece(cfg, key, owner(l), index[1:], reader(owner(l).name)) for l in layers]).astype(target)
    return jax.make_array_from_callback(arch.our_shape(cfg, key), shardings[key], shard)

  params = arch.nest({k: build(k) for k in arch.param_keys(cfg)})
  return cfg.replace(param_dtype=dtype_name(target)), params
