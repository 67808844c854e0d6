"""Checkpoints in and out: Hugging Face (safetensors, or torch .bin), Meta consolidated.*.pth, llama.cpp GGUF,
native orbax; per-architecture mapping tables (LLaMA, Mistral, Phi-3, Qwen2).

Every loader returns (model.ModelConfig, params) with params a dict of host numpy arrays in lrjax's layout (see
lrjax/model.py), layers stacked on a leading axis; place them on devices with jax.device_put and the sharding
rules. Every saver writes into a temporary sibling directory and renames it into place, so a failure never
leaves a half-written checkpoint, and an existing non-empty directory is only replaced with overwrite=True.

  arch      HF architectures as mapping tables (config fields, tensor names, fusions, biases)
  hf        HF directories (read: safetensors / torch .bin; write: safetensors)
  meta      Meta checkpoints (the q/k pair permutation)
  gguf      llama.cpp GGUF files (dequantised; tokenizer from the metadata)
  native    orbax + lrjax_config.json
  registry  which format a path holds; load any; named models ("builtin", "smollm2")
  sharded   HF safetensors straight into sharded params, each process reading only its slices
  conversion any format -> hf | meta | native, with a RoPE setting written into the config
"""

from lrjax.weights.arch import ARCHITECTURES, config_from_hf, config_to_hf, original_window
from lrjax.weights.common import WeightsError
from lrjax.weights.conversion import FORMATS, convert
from lrjax.weights.hf import load_hf, parse_size, read_config, save_hf
from lrjax.weights.meta import hf_to_meta_qk, load_meta, meta_intermediate_size, meta_to_hf_qk, save_meta
from lrjax.weights.native import config_from_dict, config_to_dict, load_native, save_native
from lrjax.weights.sharded import load_sharded
from lrjax.weights.registry import (BUILTIN_MODEL, SMOLLM2_FILE, checkpoint_format, load, load_model, load_model_for,
                                        model_path, model_tokenizer, original_length_of, smollm2_path)
