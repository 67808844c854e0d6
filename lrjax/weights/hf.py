"""Hugging Face checkpoint directories: config.json + safetensors (single or sharded), or torch .bin read with
torch.load(weights_only=True) only; written as safetensors that transformers 4.x and 5.x load, to a local
directory or any etils.epath location (gs://, ...)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax.weights import arch
from lrjax.weights.common import (WeightsError, copy_extra, dtype_name, np_dtype, read_json, staged_directory,
                                      write_json)


def _safetensors_names(path: str) -> dict[str, tuple]:
  try:
    with safe_open(path, framework="numpy") as f:
      return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
  except FileNotFoundError:
    raise WeightsError(f"{path}: missing weights file") from None
  except Exception as e:  # safetensors raises SafetensorError / OSError for corrupt headers and truncation
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise WeightsError(f"{path}: corrupt safetensors file ({first})") from None


def _safetensors_getter(files: Mapping[str, str]) -> Callable[[str], np.ndarray]:
  handles: dict[str, object] = {}

  def get(name):
    path = files[name]
    try:
      if path not in handles:
        handles[path] = safe_open(path, framework="numpy")
      return handles[path].get_tensor(name)
    except Exception as e:
      raise WeightsError(f"{path}: corrupt safetensors file, cannot read {name} ({e})") from None

  return get


def torch_module():
  try:
    import torch  # optional: only .bin / .pth checkpoints need it (not in requirements.txt)
  except ImportError:
    raise WeightsError("reading or writing torch checkpoints (.bin/.pth) needs torch; install it, or convert to "
                       "safetensors elsewhere") from None
  return torch


def torch_to_numpy(t) -> np.ndarray:
  torch = torch_module()
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def torch_load(path: str) -> dict:
  torch = torch_module()
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except FileNotFoundError:
    raise WeightsError(f"{path}: missing weights file") from None
  except Exception as e:  # weights_only refuses pickled code; zip errors mean corruption
    raise WeightsError(f"{path}: cannot load with torch.load(weights_only=True) ({str(e).splitlines()[0]})"
                       ) from None
  if not isinstance(state, dict):
    raise WeightsError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
  return state


def _index(path: str, what: str) -> dict:
  weight_map = read_json(path, what).get("weight_map")
  if not isinstance(weight_map, dict):
    raise WeightsError(f"{path}: malformed {what} (no weight_map)")
  return weight_map


def weight_sources(directory: str):
  """(names -> shape, getter, description) for whatever weights format the directory holds."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  bin_index = os.path.join(directory, "pytorch_model.bin.index.json")
  bin_single = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(index):
    files = {n: os.path.join(directory, f) for n, f in _index(index, "safetensors index").items()}
    names: dict[str, tuple] = {}
    for path in sorted(set(files.values())):
      in_file = _safetensors_names(path)
      for n, f in files.items():
        if f == path and n not in in_file:
          raise WeightsError(f"{path}: missing tensor {n} listed in the index")
      names.update({n: s for n, s in in_file.items() if files.get(n) == path})
    return names, _safetensors_getter(files), index
  if os.path.exists(single):
    names = _safetensors_names(single)
    return names, _safetensors_getter({n: single for n in names}), single
  if os.path.exists(bin_index) or os.path.exists(bin_single):
    if os.path.exists(bin_index):
      paths = sorted({os.path.join(directory, f) for f in _index(bin_index, "torch weights index").values()})
      source = bin_index
    else:
      paths, source = [bin_single], bin_single
    state = {}
    for path in paths:
      state.update(torch_load(path))
    return {n: tuple(t.shape) for n, t in state.items()}, lambda n: torch_to_numpy(state[n]), source
  raise WeightsError(f"{directory}: no weights found (expected model.safetensors, model.safetensors.index.json "
                     "or pytorch_model.bin)")


def _is_ignored(name: str) -> bool:
  # Old checkpoints carry the rotary buffer; tied models may still save lm_head (transformers ignores it too).
  return name.endswith("rotary_emb.inv_freq")


def read_config(directory: str | os.PathLike) -> model_lib.ModelConfig:
  """The ModelConfig of an HF directory's config.json (no weights read)."""
  config_path = os.path.join(os.fspath(directory), "config.json")
  try:
    return arch.config_from_hf(read_json(config_path, "config.json"))
  except WeightsError as e:
    raise WeightsError(f"{config_path}: {e}") from None


def load_hf(directory: str | os.PathLike, *, dtype: str | None = None) -> tuple[model_lib.ModelConfig, dict]:
  """Reads an HF checkpoint directory of a supported architecture (lrjax.weights.arch).

  Args:
    directory: holds config.json and model.safetensors, a sharded model-*.safetensors + index, or
      pytorch_model*.bin (read with torch.load(weights_only=True) only).
    dtype: "float32" | "bfloat16" | "float16" to cast to, or None to keep the stored dtype.
  Returns:
    (config with param_dtype set to the loaded dtype, params as host numpy arrays).
  """
  directory = os.fspath(directory)
  cfg = read_config(directory)
  names, get, source = weight_sources(directory)
  ignore = _is_ignored
  if cfg.tie_word_embeddings:
    ignore = lambda n: _is_ignored(n) or n == "lm_head.weight"
  params = arch.assemble(cfg, names, get, source, np_dtype(dtype), ignore)
  return cfg.replace(param_dtype=dtype_name(params["embed"].dtype)), params


def parse_size(size: str | int) -> int:
  """Bytes from 123, "20KB" (10^3), "5GiB" (2^30), ... as transformers' max_shard_size reads them."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
  if not m:
    raise WeightsError(f"cannot parse size {size!r} (examples: 20KB, 500MB, 5GiB, 1048576)")
  unit = m.group(2) or "B"
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
           "GIB": 2**30, "TIB": 2**40}.get(unit)
  if scale is None:
    raise WeightsError(f"cannot parse size {size!r} (unknown unit {unit})")
  return int(float(m.group(1)) * scale)


def plan_shards(cfg: model_lib.ModelConfig, dtype, max_shard_bytes: int | None, key: str | None = None
                ) -> list[list[str]]:
  """Tensor names per shard, in table order, each shard at most max_shard_bytes (a bigger tensor goes alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for t in arch.hf_table(cfg, key):
    nbytes = math.prod(t.hf_shape) * dtype.itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t.name)
    size += nbytes
  return shards


@contextlib.contextmanager
def _staged(directory: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """A local directory to write the checkpoint into: staged_directory's for a local destination; for a remote
  one (gs://...), a temporary directory uploaded through etils.epath once complete. Object stores have no
  directory rename, so config.json (what marks an HF directory) is uploaded last."""
  if "://" not in os.fspath(directory):
    with staged_directory(directory, overwrite) as tmp:
      yield tmp
    return
  dest = epath.Path(directory)
  if dest.exists() and list(dest.iterdir()) and not overwrite:
    raise WeightsError(f"{dest} exists and is not empty (pass overwrite=True to replace it)")
  with tempfile.TemporaryDirectory(prefix="lrjax-export-") as tmp:
    yield tmp
    if dest.exists():
      dest.rmtree()
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
      with open(os.path.join(tmp, name), "rb") as src, (dest / name).open("wb") as dst:
        shutil.copyfileobj(src, dst, 64 << 20)


def save_hf(directory: str | os.PathLike, config: model_lib.ModelConfig, params: dict, *,
            rope_scaling: rope_lib.RopeScaling | None = None, dtype: str = "float32",
            max_shard_bytes: int | None = None, overwrite: bool = False, allow_dropping_n_hat: bool = False,
            extra_files: Mapping[str, str] | None = None) -> None:
  """Writes an HF checkpoint of the model's architecture that transformers 4.x and 5.x load.

  Args:
    directory: destination (local or any epath location); must not exist or be empty, unless overwrite=True.
    config, params: the model (params in lrjax's layout, numpy or jax arrays).
    rope_scaling: the scaling to write into config.json (default: config.rope_scaling).
    dtype: storage dtype of the tensors.
    max_shard_bytes: split into model-0000k-of-0000n.safetensors + index when tensors exceed this.
    allow_dropping_n_hat: export a LongRoPE setting with n̂ > 0 without its n̂ (HF configs cannot express it).
    extra_files: {name: source path} copied alongside (tokenizer files).
  """
  target = np_dtype(dtype)
  flat = arch.check_params(config, params)
  hf_config = arch.config_to_hf(config, rope_scaling=rope_scaling, dtype=dtype,
                                allow_dropping_n_hat=allow_dropping_n_hat)
  key = arch.export_architecture(config)
  shards = plan_shards(config, target, max_shard_bytes, key)
  with _staged(directory, overwrite) as tmp:
    tensors = arch.hf_tensors(config, flat, target, key)
    weight_map = {}
    for k, names in enumerate(shards):
      fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      shard = dict(next(tensors) for _ in names)
      save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
      weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
      total = sum(math.prod(t.hf_shape) for t in arch.hf_table(config, key))
      write_json(os.path.join(tmp, "model.safetensors.index.json"),
                 {"metadata": {"total_size": total * target.itemsize, "total_parameters": total},
                  "weight_map": weight_map})
    write_json(os.path.join(tmp, "config.json"), hf_config)
    copy_extra(tmp, extra_files)
