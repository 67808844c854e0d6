"""Pre-training the built-in model: a byte-level LLaMA on the built-in Python corpus (builtin:train only).

  python experiments/train.py --config=configs/pretrain.py --workdir=/tmp/pretrain
  python experiments/train.py --config=configs/pretrain.py:tiny --workdir=/tmp/tiny   # seconds, for tests

Window 256 tokens (= bytes); head_dim 64 gives 32 rotary frequencies for the factor search; GQA 4 query / 2
key-value heads. The size and step count were chosen by measuring the step time on a shared 2-core CPU so
that the run takes about 45 minutes.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2,
      head_dim=64, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
      rms_norm_eps=1e-6, dtype="float32", param_dtype="float32", attention="auto", block_q=512,
      block_k=512, scan_layers=True, remat="none"))
  c.init = ""  # "" = random init; else a model lrjax.weights.load reads (HF directory, ...)
  # Training input (lrjax.stream, lrjax.train.feed): one source (an lrjax.data source, tokenized at start-up, or
  # a directory prepared by experiments/prepare_data.py), or a weighted mixture [{path, weight, min_tokens,
  # max_tokens}]; separator None: the tokenizer's EOS, or the NUL byte [0] for the byte tokenizer.
  c.data = ml_collections.ConfigDict(dict(source="builtin:train", tokenizer="byte", separator=None))
  c.data.separator = ml_collections.FieldReference(None, field_type=tuple)
  c.data.mixture = []
  c.data.document_mask = False        # attention within each packed document only (default: the paper's)
  c.data.reset_positions = False      # positions restart at 0 in each document
  c.data.mixed_original_length = 0    # LongRoPE2 mixed window: documents <= this many tokens keep the original
  #                                     RoPE (needs reset_positions and, as LongRoPE2, document_mask)
  c.data.num_workers = 0              # grain prefetch processes
  c.batch_size = 16  # sequences per optimizer step (global)
  c.accumulation = 1  # microbatches per step
  c.optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  c.stages = [ml_collections.ConfigDict(dict(length=256, steps=500, rope="default", rope_factor=1.0,
                                             lr=2e-3, schedule="cosine", warmup_steps=50, end_lr_ratio=0.1))]
  c.loss_chunk = 2048
  c.nan_policy = "skip"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.peak_flops = 0.0  # FLOP/s of one device for MFU; 0 = measure a matmul at start-up (CPU only)
  c.export_hf = ""  # when set, the final params are written there as a Hugging Face directory
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  if arg in (None, ""):
    return c
  if arg == "tiny":  # a few seconds on one CPU core; used by the tests
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=16, max_position_embeddings=64)
    c.batch_size = 8  # divisible by the 8 simulated devices of the tests
    c.stages[0].update(length=32, steps=20, lr=3e-3, warmup_steps=2)
    c.log_every = 5
    c.checkpoint_every = 10
    c.peak_flops = 1e9
    return c
  raise ValueError(f"unknown pretrain config variant {arg!r}; expected '' or 'tiny'")
