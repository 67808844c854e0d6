"""HF safetensors checkpoints restored straight into sharded parameters: each process reads only the slices its
devices own, so peak host memory per process is about its share of the weights.

The files are read with positioned reads, not memory-mapped: a column block of a row-major tensor (the embed
dim of a weight sharded over fsdp) touches every page of the tensor, and mapped pages would count against the
process's resident memory; read in row chunks, only the block itself is kept.

The parameter shardings are lrjax.sharding's (embed over fsdp x sequence, heads / mlp / vocab over tensor); the
layer axis and head_dim are never split, so every device's piece of a parameter is one contiguous block of rows
and columns of each stored HF tensor (a fused Phi-3 tensor: of its part's rows).
"""

from __future__ import annotations

import os
import json
import struct

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


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_CHUNK = 16 << 20  # bytes of rows read at a time for a column block


class SafetensorsFile:
  """Blocks of the tensors of one .safetensors file, read with positioned reads (see the module docstring)."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        self.header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
      raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    self.start = 8 + n

  def dtype(self, name: str) -> str:
    kind = self.header[name]["dtype"]
    if kind not in _DTYPES:
      raise WeightsError(f"{self.path}: tensor {name} has dtype {kind}; sharded loading reads {', '.join(_DTYPES)}")
    return _DTYPES[kind]

  def read(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None) -> np.ndarray:
    """tensor[r0:r1] (1-D or whole rows) or tensor[r0:r1, c0:c1] as a new array."""
    info = self.header[name]
    dt = np_dtype(self.dtype(name))
    shape = info["shape"]
    row_bytes = dt.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    base = self.start + info["data_offsets"][0]
    r0, r1 = rows
    with open(self.path, "rb", buffering=0) as f:
      if cols is None or (cols[0] == 0 and cols[1] == shape[1]):
        f.seek(base + r0 * row_bytes)
        out = np.frombuffer(f.read((r1 - r0) * row_bytes), dt).reshape((r1 - r0,) + tuple(shape[1:]))
        return out.copy()
      c0, c1 = cols
      out = np.empty((r1 - r0, c1 - c0), dt)
      step = max(1, _CHUNK // row_bytes)
      for r in range(r0, r1, step):
        n = min(step, r1 - r)
        f.seek(base + r * row_bytes)
        block = np.frombuffer(f.read(n * row_bytes), dt).reshape(n, shape[1])
        out[r - r0:r - r0 + n] = block[:, c0:c1]
      return out


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
  handles: dict[str, SafetensorsFile] = {}

  def reader(name):
    path = files[name]
    if path not in handles:
      handles[path] = SafetensorsFile(path)
    return lambda rows, cols: handles[path].read(name, rows, cols)

  stored = SafetensorsFile(files[table["embed"].name]).dtype(table["embed"].name)
  target = np_dtype(dtype) or np_dtype(stored)
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
