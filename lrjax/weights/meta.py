"""Meta checkpoints: params.json + consolidated.*.pth (model-parallel shards are joined).

Meta pairs adjacent q/k dims for RoPE where HF (and lrjax) split each head in halves; load_meta/save_meta apply
the per-head permutation between the two (GQA-aware: k uses the kv head count). torch files are read with
torch.load(weights_only=True) only.
"""

from __future__ import annotations

import glob
import math
import os
import re
import warnings
from typing import Mapping

import numpy as np

from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax.weights import arch
from lrjax.weights.common import (WeightsError, copy_extra, dtype_name, np_dtype, read_json, staged_directory,
                                      write_json)
from lrjax.weights.hf import torch_load, torch_module, torch_to_numpy

_META_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


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
  p = read_json(params_path, "params.json")
  unknown = sorted(set(p) - _META_KNOWN)
  if unknown:
    warnings.warn(f"{params_path}: ignoring unknown keys {', '.join(unknown)}", stacklevel=2)
  for key in ("dim", "n_layers", "n_heads"):
    if not isinstance(p.get(key), int):
      raise WeightsError(f"{params_path}: missing integer field {key}")
  paths = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
  if not paths:
    raise WeightsError(f"{directory}: no consolidated.*.pth files")
  states = [torch_load(path) for path in paths]
  keys = set(states[0]) - {"rope.freqs"}
  for path, state in zip(paths[1:], states[1:]):
    if set(state) - {"rope.freqs"} != keys:
      raise WeightsError(f"{path}: tensor names differ from {paths[0]}")
  tensors = {k: _meta_concat(k, [torch_to_numpy(s[k]) for s in states], p["dim"]) for k in sorted(keys)}
  source = paths[0] if len(paths) == 1 else f"{directory}/consolidated.*.pth"
  if "tok_embeddings.weight" not in tensors:
    raise WeightsError(f"{source}: missing tensor tok_embeddings.weight")
  cfg = _meta_config(p, tensors, source, params_path, max_position_embeddings)
  hf = _meta_to_hf_names(tensors, cfg, source)
  params = arch.assemble(cfg, {n: w.shape for n, w in hf.items()}, hf.__getitem__, source, np_dtype(dtype))
  return cfg.replace(param_dtype=dtype_name(params["embed"].dtype)), params


def _meta_config(p: dict, tensors: dict, source: str, params_path: str,
                 max_position_embeddings: int | None) -> model_lib.ModelConfig:
  """The ModelConfig params.json and the tensors' shapes describe (checked against each other)."""
  dim, n_heads = p["dim"], p["n_heads"]
  vocab = tensors["tok_embeddings.weight"].shape[0]
  if p.get("vocab_size", -1) not in (-1, vocab):
    raise WeightsError(f"{source}: tok_embeddings has {vocab} rows but params.json says vocab_size "
                       f"{p['vocab_size']}")
  n_kv = p.get("n_kv_heads") or n_heads
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
  return cfg


def _meta_to_hf_names(tensors: dict, cfg: model_lib.ModelConfig, source: str) -> dict:
  """Meta tensor names -> HF names, q/k rows permuted to HF's half-split order; unknown names kept (reported
  as unexpected by arch.assemble)."""
  dim, n_heads, n_kv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
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
      if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = w
    else:
      hf[name] = w
  return hf


def save_meta(directory: str | os.PathLike, config: model_lib.ModelConfig, params: dict, *,
              dtype: str = "bfloat16", overwrite: bool = False,
              extra_files: Mapping[str, str] | None = None) -> None:
  """Writes a single-shard Meta checkpoint (consolidated.00.pth + params.json); inverse of load_meta.

  Meta's params.json can carry only plain RoPE, fixed NTK (as a larger rope_theta) and Llama 3 scaling with
  Meta's constants (low 1, high 4, original 8192); anything else is an error.
  """
  torch = torch_module()
  target = np_dtype(dtype)
  flat = arch.check_params(config, params)
  if config.partial_rotary_factor != 1.0 or config.qkv_bias or config.sliding_window is not None:
    raise WeightsError("Meta checkpoints express plain LLaMA only (no partial rotary dim, q/k/v biases or sliding "
                       "window); save as hf or native instead")
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
    w = np.ascontiguousarray(np.asarray(w).astype(target, copy=False))
    if target.name == "bfloat16":
      return torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(w)

  state = {}
  for name, w in arch.hf_tensors(config, flat, target, "llama"):
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
  with staged_directory(directory, overwrite) as tmp:
    torch.save(state, os.path.join(tmp, "consolidated.00.pth"))
    write_json(os.path.join(tmp, "params.json"), meta_params)
    copy_extra(tmp, extra_files)
