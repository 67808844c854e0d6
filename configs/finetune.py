"""Fine-tuning with extended RoPE: the LongRoPE paper's recipes, and a CPU-sized one on the built-in model.

  python experiments/train.py --config=configs/finetune.py:VARIANT --workdir=DIR \
      [--config.init=/path/to/hf_model] [--config.stages[0].rope=/path/to/factors.json]

Variants:
  llama2      LLaMA2-7B: 400 steps at 128k with the 128k factors, then 600 steps at 256k with the 256k factors
              starting from the 128k result; lr 2e-5 linear decay, global batch 32 (paper §4.1, App. A.2).
  mistral     Mistral-7B v0.1: 400 steps at 16k, constant lr 1e-6, global batch 64 (YaRN's recipe, which the
              paper follows for both its 128k and 256k Mistral models; the factor file picks which).
  llama2_v5p, mistral_v5p   the same recipes laid out for a TPU v5p-128 slice (64 chips, 95 GB HBM each)
              instead of 8 x H100 (80 GB): data=8 x sequence=8 (LLaMA2) or data=8 x fsdp=8 (Mistral).
  longrope2_mix   LongRoPE2's mid-training of LLaMA3-8B to 128k (LongRoPE2 §3.3, §4.1): 10B tokens, 1 epoch
              (1192 steps of 64 x 128k), lr 2e-5 cosine, on a mixture of prepared directories (token shares:
              RedPajama-v1 45%, RedPajama-v2 25%, StarCoder 20% (documents of 8k-200k tokens), FineWeb-Edu 10%
              (short: <= 8k)), every row packed from documents with BOS/EOS, document masks and positions
              restarting per document, and the mixed context window: documents <= 8192 tokens (L_train) keep
              the original RoPE, longer ones use the searched LongRoPE2 factors. 64 A100-80GB as in the paper:
              data=8 x sequence=8 (ring attention over 8 GPUs per sequence).
  tiny        the built-in byte-level model (lrjax/assets/model, window 256) fine-tuned at 8x = 2048 tokens;
              rope defaults to linear interpolation (PI, factor 8); pass a searched LongRoPE factor file as
              --config.stages[0].rope=... to fine-tune LongRoPE. About 10-25 s/step on 2 shared CPU
              cores (200 steps: about an hour).

`init`, the data source and the tokenizer of the paper variants are placeholders you must point at real files
(the run stops with one line naming the missing file otherwise). llama2 uses the published fine-tuning factor
tables in configs/factors (s = stage length / 4096 sets the temperature); mistral needs your searched factors. Optimizer settings follow the authors' fine-tuning template:
Adam (0.9, 0.999), eps 1e-8, no weight decay, gradient clipping 1.0, warmup 20 steps.

Paper variants carry their hardware: `mesh` and `device_memory_gb`. `--config.dry_run=True` compiles every
stage's sharded step on simulated CPU devices with abstract weights (no checkpoint, no data), prints the
per-device memory and FLOPs, and fails with one line when a layout does not fit (lrjax.dryrun). A pod layout
is checked on an 8-device slice of its data axis, whose per-device program is identical.
"""

import os

import ml_collections

from configs import pretrain

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FACTORS = os.path.join(_ROOT, "configs", "factors")

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
# Mistral-7B v0.1 was trained at 4096 tokens (its sliding window) although max_position_embeddings says 32768;
# the paper and the official code measure s against 4096.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, rope_theta=10000.0, max_position_embeddings=32768,
                  original_max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _stage(length, steps, rope, lr, schedule, warmup=20, rope_factor=1.0):
  return ml_collections.ConfigDict(dict(length=length, steps=steps, rope=rope, rope_factor=rope_factor, lr=lr,
                                        schedule=schedule, warmup_steps=warmup, end_lr_ratio=0.0))


def _large(c, arch):
  """Accelerator settings for a 7B model at 16k-256k tokens."""
  c.model.update(**arch, dtype="bfloat16", param_dtype="float32", attention="blockwise", block_q=2048,
                 block_k=2048, scan_layers=True, remat="full")
  c.optimizer.update(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
  c.loss_chunk = 4096
  c.data.tokenizer = "/path/to/model/tokenizer.model"  # bookends: the tokenizer's BOS/EOS
  c.mesh.update(data=1, fsdp=-1, sequence=1, tensor=1)
  c.dry_run = False
  c.device_memory_gb = 80.0  # H100/H200-80GB class (0 = no fit check)
  c.checkpoint_every = 50
  c.peak_flops = 0.0  # set the accelerator's peak (e.g. 989e12 for H100 bf16) to get MFU


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = pretrain.base_config()
  if arg == "llama2":
    _large(c, LLAMA2_7B)
    c.init = "/path/to/Llama-2-7b-hf"
    c.data.source = "/path/to/redpajama.jsonl"
    # 8 x H100: the 128k/256k sequence split over all 8 GPUs (ring attention); weights sharded ZeRO-style
    # over the same 8 (lrjax.sharding's embed rule); one sequence per microbatch.
    c.model.attention = "ring"
    c.mesh.update(data=1, fsdp=1, sequence=8, tensor=1)
    c.batch_size = 32
    c.accumulation = 32
    c.stages = [_stage(131072, 400, os.path.join(_FACTORS, "llama2_7b_ft_128k.csv"), 2e-5, "linear"),
                _stage(262144, 600, os.path.join(_FACTORS, "llama2_7b_ft_256k.csv"), 2e-5, "linear")]
  elif arg == "mistral":
    _large(c, MISTRAL_7B)
    c.init = "/path/to/Mistral-7B-v0.1"
    c.data.source = "/path/to/long-data-collections.jsonl"
    c.mesh.update(data=1, fsdp=8, sequence=1, tensor=1)  # 8 x H100, 16k tokens fit one GPU's attention
    c.batch_size = 64
    c.accumulation = 8
    c.stages = [_stage(16384, 400, "/path/to/factors_mistral_128k.json", 1e-6, "constant", warmup=0)]
  elif arg == "llama2_v5p":
    c = get_config("llama2")
    c.mesh.update(data=8, fsdp=1, sequence=8, tensor=1)
    c.accumulation = 4  # 8 sequences per microbatch, one per data replica
    c.device_memory_gb = 95.0
  elif arg == "mistral_v5p":
    c = get_config("mistral")
    c.mesh.update(data=8, fsdp=8, sequence=1, tensor=1)
    c.accumulation = 1
    c.device_memory_gb = 95.0
  elif arg == "longrope2_mix":
    _large(c, LLAMA3_8B)
    c.init = "/path/to/Meta-Llama-3-8B"
    c.data.tokenizer = "/path/to/Meta-Llama-3-8B/tokenizer.json"
    c.data.source = ""
    # Directories prepared by experiments/prepare_data.py with the model's tokenizer; weights are token shares
    # (every row is full, so row shares are token shares); length filters count packed tokens.
    c.data.mixture = [
        dict(path="/path/to/records/redpajama_v1", weight=0.45, min_tokens=0, max_tokens=200000),
        dict(path="/path/to/records/redpajama_v2", weight=0.25, min_tokens=0, max_tokens=200000),
        dict(path="/path/to/records/starcoder", weight=0.20, min_tokens=8192, max_tokens=200000),
        dict(path="/path/to/records/fineweb_edu", weight=0.10, min_tokens=0, max_tokens=8192)]
    c.data.update(document_mask=True, reset_positions=True, mixed_original_length=8192)
    c.model.attention = "ring"
    c.mesh.update(data=8, fsdp=1, sequence=8, tensor=1)
    c.batch_size = 64
    c.accumulation = 8  # one sequence per data replica per microbatch
    c.stages = [_stage(131072, 1192, "/path/to/longrope2_llama3_8b_128k.json", 2e-5, "cosine")]
  elif arg == "tiny":
    c.init = "builtin"
    c.batch_size = 4
    c.optimizer.update(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
    c.stages = [_stage(2048, 200, "linear", 2e-4, "linear", warmup=10, rope_factor=8.0)]
    c.checkpoint_every = 50
  else:
    raise ValueError(f"unknown finetune variant {arg!r}; expected llama2, llama2_v5p, mistral, mistral_v5p, "
                     "longrope2_mix or tiny")
  return c
