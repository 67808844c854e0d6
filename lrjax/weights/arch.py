"""Hugging Face architectures as small mapping tables: config fields and tensor names <-> lrjax's params.

Each supported architecture is one `Architecture` row: its model_type, which decoder-layer tensors it stores
(and which are fused: Phi-3's qkv_proj and gate_up_proj hold several of ours, split by rows), q/k/v biases
(Qwen2), whether config.sliding_window is an attention window (Mistral, Phi-3), and how its original window is
declared. Everything else (transposes, head reshapes, the stacked layer axis) is shared:

  model.embed_tokens.weight [V, D]            -> embed [V, D]
  layers.i.self_attn.q_proj.weight [N·H, D]   -> layers/q[i] [D, N, H]   (k, v: [K·H, D] -> [D, K, H])
  layers.i.self_attn.q_proj.bias [N·H]        -> layers/q_bias[i] [N, H]
  layers.i.self_attn.o_proj.weight [D, N·H]   -> layers/o[i] [N, H, D]
  layers.i.mlp.gate_proj / up_proj [F, D]     -> layers/gate[i], layers/up[i] [D, F]
  layers.i.mlp.down_proj [D, F]               -> layers/down[i] [F, D]
  layers.i.input_layernorm [D]                -> layers/attn_norm[i];  post_attention_layernorm -> mlp_norm
  model.norm.weight [D]                       -> final_norm;  lm_head.weight [V, D] -> lm_head [D, V]

An architecture lrjax cannot express is refused in one line naming what it lacks.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np

from lrjax import factors
from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax.weights.common import WeightsError, flatten, nest

_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One HF architecture. layer_tensors: (HF name within a layer, our keys it holds, in row order)."""

  name: str
  model_type: str
  layer_tensors: tuple[tuple[str, tuple[str, ...]], ...]
  qkv_bias: bool = False
  sliding_window: bool = False         # config.sliding_window is an attention window
  window_is_original: bool = False     # the official LongRoPE rule: the sliding window is the trained window
  default_original: int | None = None  # the original window when the config has none (Phi3Config: 4096)
  partial_rotary: bool = False         # partial_rotary_factor < 1 is honoured (Phi-4-mini)


def _separate(bias: bool = False) -> tuple:
  tensors = [(f"{_ATTN[k]}.weight", (f"layers/{k}",)) for k in "qkvo"]
  if bias:
    tensors += [(f"{_ATTN[k]}.bias", (f"layers/{k}_bias",)) for k in "qkv"]
  tensors += [(f"{_MLP[k]}.weight", (f"layers/{k}",)) for k in ("gate", "up", "down")]
  return tuple(tensors + [(hf, (f"layers/{k}",)) for k, hf in _NORMS.items()])


_PHI3_TENSORS = (("self_attn.qkv_proj.weight", ("layers/q", "layers/k", "layers/v")),
                 ("self_attn.o_proj.weight", ("layers/o",)),
                 ("mlp.gate_up_proj.weight", ("layers/gate", "layers/up")),
                 ("mlp.down_proj.weight", ("layers/down",))) + tuple((hf, (f"layers/{k}",)) for k, hf in _NORMS.items())

ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", _separate()),
    "mistral": Architecture("MistralForCausalLM", "mistral", _separate(), sliding_window=True,
                            window_is_original=True),
    "phi3": Architecture("Phi3ForCausalLM", "phi3", _PHI3_TENSORS, sliding_window=True, default_original=4096,
                         partial_rotary=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", _separate(bias=True), qkv_bias=True),
}
_BY_CLASS = {a.name: key for key, a in ARCHITECTURES.items()}
# Known architectures lrjax cannot express, with what it lacks.
_REFUSED = {
    "gemma": "Gemma's GeGLU MLP, (1 + w) RMSNorm and sqrt(D)-scaled embeddings",
    "gemma2": "Gemma 2's logit soft-capping, alternating local/global layers and extra norms",
    "gemma3": "Gemma 3's alternating local/global layers, QK norms and dual RoPE bases",
    "mixtral": "mixture-of-experts MLPs (num_local_experts)",
    "qwen2_moe": "mixture-of-experts MLPs (num_experts)",
    "phimoe": "mixture-of-experts MLPs (num_local_experts)",
    "gpt2": "GPT-2's learned positions and LayerNorm (no RoPE)",
}


def architecture_of(config: dict) -> str:
  """The key of ARCHITECTURES a config.json describes; architectures and model_type must agree."""
  archs = config.get("architectures") or []
  model_type = config.get("model_type")
  keys = set()
  for name in archs:
    if name not in _BY_CLASS:
      base = name.removesuffix("ForCausalLM").lower()
      lacking = _REFUSED.get(base) or _REFUSED.get(model_type or "")
      raise WeightsError(f"unsupported architecture {name}" + (f": lrjax has no {lacking}" if lacking else "")
                         + f" (supported: {', '.join(a.name for a in ARCHITECTURES.values())})")
    keys.add(_BY_CLASS[name])
  if len(keys) > 1:
    raise WeightsError(f"config lists several architectures {archs}")
  if model_type in _REFUSED:
    raise WeightsError(f"unsupported model_type {model_type!r}: lrjax has no {_REFUSED[model_type]}")
  if keys:
    key = keys.pop()
    if model_type is not None and model_type != ARCHITECTURES[key].model_type:
      raise WeightsError(f"config says model_type {model_type!r} but architectures {archs}; they must agree "
                         f"(expected model_type {ARCHITECTURES[key].model_type!r})")
    return key
  if model_type not in ARCHITECTURES:
    raise WeightsError(f"unsupported model_type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
  return model_type


# ----------------------------------------------------------------------------------------------------------
# Config fields.


def _refuse_unsupported(config: dict, key: str) -> None:
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise WeightsError(f"unsupported hidden_act {act!r} (only silu)")
  for name in ("attention_bias", "mlp_bias"):
    if config.get(name):
      raise WeightsError(f"unsupported {name}=true ({ARCHITECTURES[key].name} in lrjax has no such biases)")
  if key == "qwen2" and config.get("use_sliding_window"):
    raise WeightsError("Qwen2 use_sliding_window=true (sliding windows on some layers only) is not supported")
  for name in ("num_local_experts", "num_experts"):
    if config.get(name):
      raise WeightsError(f"mixture-of-experts ({name}={config[name]}) is not supported")


def original_window(config: dict, scaling: rope_lib.RopeScaling, key: str) -> int | None:
  """The pre-training window of an HF checkpoint, or None for max_position_embeddings.

  In order: original_max_position_embeddings (Phi-3 keeps it at the top level; YaRN / Llama 3 / longrope in the
  rope dict); then Mistral's rule, as the official LongRoPE code applies it: the sliding window is the window the
  model was trained at (Mistral-7B v0.1: 4096 of max_position_embeddings 32768); then the architecture's default
  (Phi3Config: 4096).
  """
  arch = ARCHITECTURES[key]
  if config.get("original_max_position_embeddings"):
    return int(config["original_max_position_embeddings"])
  if scaling.original_max_position_embeddings:
    return int(scaling.original_max_position_embeddings)
  if arch.window_is_original and config.get("sliding_window"):
    return int(config["sliding_window"])
  return arch.default_original


def config_from_hf(config: dict) -> model_lib.ModelConfig:
  """A ModelConfig from an HF config.json dict of a supported architecture (v4 or v5 rope form)."""
  if not isinstance(config, dict):
    raise WeightsError(f"config must be a JSON object, got {type(config).__name__}")
  key = architecture_of(config)
  arch = ARCHITECTURES[key]
  _refuse_unsupported(config, key)
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if not isinstance(config.get(k), int)]
  if missing:
    raise WeightsError(f"config is missing integer field(s) {', '.join(missing)}")
  if arch.default_original and not config.get("original_max_position_embeddings"):
    config = dict(config, original_max_position_embeddings=arch.default_original)
  try:
    theta, scaling = factors.rope_scaling_from_hf(config)
  except rope_lib.RopeError as e:
    raise WeightsError(str(e)) from None
  partial = factors.hf_rope_dict(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0) and not arch.partial_rotary:
    raise WeightsError(f"partial_rotary_factor={partial} is not supported for {arch.name} checkpoints")
  window = config.get("sliding_window") if arch.sliding_window else None
  if config.get("sliding_window") is not None and not arch.sliding_window and key != "qwen2":
    warnings.warn(f"sliding_window={config['sliding_window']} ignored: {arch.name} attends to the whole window",
                  stacklevel=2)
  heads = config["num_attention_heads"]
  eos = config.get("eos_token_id")
  try:
    cfg = model_lib.ModelConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, rope_theta=theta,
        partial_rotary_factor=float(partial or 1.0), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        original_max_position_embeddings=original_window(config, scaling, key), rope_scaling=scaling,
        bos_token_id=config.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        qkv_bias=arch.qkv_bias, sliding_window=int(window) if window else None, architecture=key)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"invalid model config: {e}") from None
  if scaling.method == "longrope":
    validate_scaling(scaling, cfg, "config.json")
  return cfg


def validate_scaling(scaling, cfg, source):
  try:
    factors.validate(scaling, n_layers=cfg.num_layers, rotary_dim=cfg.rotary_dim, source=source)
  except factors.FactorFileError as e:
    raise WeightsError(str(e)) from None


def export_architecture(config: model_lib.ModelConfig) -> str:
  """The architecture an export is written as: the model's own, except that a LLaMA with a sliding window
  becomes Mistral (LlamaForCausalLM has none) and Qwen2 biases / Phi-3 partial rotary must match theirs."""
  key = config.architecture
  if key == "llama" and config.sliding_window is not None:
    key = "mistral"
  arch = ARCHITECTURES[key]
  if config.qkv_bias != arch.qkv_bias:
    raise WeightsError(f"{arch.name} {'requires' if arch.qkv_bias else 'has no'} q/k/v biases "
                       f"(this model has qkv_bias={config.qkv_bias})")
  if config.partial_rotary_factor != 1.0 and not arch.partial_rotary:
    raise WeightsError(f"partial_rotary_factor={config.partial_rotary_factor} cannot be expressed for {arch.name}")
  if config.sliding_window is not None and not arch.sliding_window:
    raise WeightsError(f"a sliding window cannot be expressed for {arch.name}")
  return key


def config_to_hf(config: model_lib.ModelConfig, *, rope_scaling: rope_lib.RopeScaling | None = None,
                 dtype: str = "float32", allow_dropping_n_hat: bool = False) -> dict:
  """An HF config.json dict of the model's architecture; rope in both the transformers 4 and 5 forms."""
  key = export_architecture(config)
  arch = ARCHITECTURES[key]
  scaling = config.rope_scaling if rope_scaling is None else rope_scaling
  try:
    rope_fields = factors.rope_scaling_to_hf(scaling, rope_theta=config.rope_theta,
                                             max_position_embeddings=config.max_position_embeddings,
                                             rotary_dim=config.rotary_dim, allow_dropping_n_hat=allow_dropping_n_hat)
  except rope_lib.RopeError as e:
    raise WeightsError(str(e)) from None
  if config.original_length != config.max_position_embeddings or arch.default_original:
    rope_fields.setdefault("original_max_position_embeddings", config.original_length)
  if config.partial_rotary_factor != 1.0:
    rope_fields["partial_rotary_factor"] = config.partial_rotary_factor
    if rope_fields.get("rope_parameters"):
      rope_fields["rope_parameters"]["partial_rotary_factor"] = config.partial_rotary_factor
  eos = config.eos_token_id
  out = {
      "architectures": [arch.name], "model_type": arch.model_type, "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings, "attention_dropout": 0.0,
      "bos_token_id": config.bos_token_id, "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
      # lrjax has no padding id; an explicit null keeps a class default (Phi-3: 32000) out of a small vocab.
      "pad_token_id": None, "dtype": str(dtype), **rope_fields}
  if key == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if arch.sliding_window:
    out["sliding_window"] = config.sliding_window
  if key == "qwen2":
    out["use_sliding_window"] = False
  return out


# ----------------------------------------------------------------------------------------------------------
# The tensor table.


class Tensor(NamedTuple):
  """One stored HF tensor: its name, our keys it holds (split by rows in this order), the layer index."""
  name: str
  keys: tuple[str, ...]
  layer: int | None
  hf_shape: tuple


def _hf_rows(c: model_lib.ModelConfig, key: str) -> int:
  N, K, H, F, D = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.hidden_size
  return {"layers/q": N * H, "layers/k": K * H, "layers/v": K * H, "layers/o": D, "layers/gate": F,
          "layers/up": F, "layers/down": D, "layers/q_bias": N * H, "layers/k_bias": K * H,
          "layers/v_bias": K * H, "layers/attn_norm": D, "layers/mlp_norm": D}[key]


def _hf_cols(c: model_lib.ModelConfig, key: str) -> tuple:
  if key.endswith(("_bias", "norm")):
    return ()
  return (c.num_heads * c.head_dim,) if key == "layers/o" else (c.intermediate_size,) if key == "layers/down" \
      else (c.hidden_size,)


def hf_table(c: model_lib.ModelConfig, key: str | None = None) -> list[Tensor]:
  """Every HF tensor of a model of architecture `key` (default: the model's own), in file order."""
  arch = ARCHITECTURES[key or c.architecture]
  D, V = c.hidden_size, c.vocab_size
  table = [Tensor("model.embed_tokens.weight", ("embed",), None, (V, D))]
  for i in range(c.num_layers):
    for hf, keys in arch.layer_tensors:
      rows = sum(_hf_rows(c, k) for k in keys)
      table.append(Tensor(f"model.layers.{i}.{hf}", keys, i, (rows,) + _hf_cols(c, keys[0])))
  table.append(Tensor("model.norm.weight", ("final_norm",), None, (D,)))
  if not c.tie_word_embeddings:
    table.append(Tensor("lm_head.weight", ("lm_head",), None, (V, D)))
  return table


def our_shape(c: model_lib.ModelConfig, key: str) -> tuple:
  D, N, K, H, F, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
  per_layer = {"layers/q": (D, N, H), "layers/k": (D, K, H), "layers/v": (D, K, H), "layers/o": (N, H, D),
               "layers/gate": (D, F), "layers/up": (D, F), "layers/down": (F, D), "layers/attn_norm": (D,),
               "layers/mlp_norm": (D,), "layers/q_bias": (N, H), "layers/k_bias": (K, H), "layers/v_bias": (K, H)}
  if key in per_layer:
    return (c.num_layers, *per_layer[key])
  return {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V)}[key]


def param_keys(c: model_lib.ModelConfig) -> set[str]:
  return {k for t in hf_table(c, "qwen2" if c.qkv_bias else "llama") for k in t.keys}


def hf_to_ours(key: str, w: np.ndarray, c: model_lib.ModelConfig) -> np.ndarray:
  D, H = c.hidden_size, c.head_dim
  if key in ("layers/q", "layers/k", "layers/v"):
    return w.T.reshape(D, -1, H)
  if key.endswith("_bias"):
    return w.reshape(-1, H)
  if key == "layers/o":
    return w.T.reshape(-1, H, D)
  if key in ("layers/gate", "layers/up", "layers/down", "lm_head"):
    return w.T
  return w


def ours_to_hf(key: str, w: np.ndarray, c: model_lib.ModelConfig) -> np.ndarray:
  D, H = c.hidden_size, c.head_dim
  if key in ("layers/q", "layers/k", "layers/v"):
    return w.reshape(D, -1).T
  if key.endswith("_bias"):
    return w.reshape(-1)
  if key == "layers/o":
    return w.reshape(-1, D).T
  if key in ("layers/gate", "layers/up", "layers/down", "lm_head"):
    return w.T
  return w


def check_params(c: model_lib.ModelConfig, params: dict) -> dict:
  """The flat params, after checking their keys and shapes against the config."""
  flat = flatten(params)
  expected = param_keys(c)
  missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
  if missing or extra:
    raise WeightsError(f"params do not match the config: missing {missing or 'none'}, unexpected {extra or 'none'}")
  for key in expected:
    if tuple(np.shape(flat[key])) != our_shape(c, key):
      raise WeightsError(f"param {key} has shape {tuple(np.shape(flat[key]))}, config expects {our_shape(c, key)}")
  return flat


def assemble(c: model_lib.ModelConfig, names: Mapping[str, tuple], get: Callable[[str], np.ndarray],
             source: str, dtype=None, ignore: Callable[[str], bool] = lambda n: False) -> dict:
  """Our params from HF-named tensors: `names` maps every available name to its shape, `get` loads one."""
  table = hf_table(c)
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
      raise WeightsError(f"{source}: tensor {t.name} has shape {tuple(names[t.name])}, config expects {t.hf_shape}")
  flat: dict[str, np.ndarray] = {}
  for t in table:
    w = np.asarray(get(t.name))
    dtype = w.dtype if dtype is None else dtype
    bounds = np.cumsum([0] + [_hf_rows(c, k) for k in t.keys]) if t.layer is not None else [0, w.shape[0]]
    for key, lo, hi in zip(t.keys, bounds[:-1], bounds[1:]):
      part = hf_to_ours(key, w[lo:hi].astype(dtype, copy=False), c)
      if t.layer is None:
        flat[key] = np.ascontiguousarray(part)
      else:
        if key not in flat:
          flat[key] = np.empty(our_shape(c, key), dtype)
        flat[key][t.layer] = part
  return nest(flat)


def hf_tensors(c: model_lib.ModelConfig, flat: dict, dtype, key: str | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor) of every table entry, fused parts concatenated by rows, in `dtype`."""
  for t in hf_table(c, key):
    parts = [ours_to_hf(k, np.asarray(flat[k] if t.layer is None else flat[k][t.layer]), c) for k in t.keys]
    w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    yield t.name, np.ascontiguousarray(w.astype(dtype, copy=False))
