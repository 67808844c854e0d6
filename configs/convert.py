"""Checkpoint conversion (lrjax.weights.convert).

  python experiments/convert.py --config=configs/convert.py --config.source=/ckpt/Llama-2-7b \
      --config.dest=/ckpt/Llama-2-7b-hf
  python experiments/convert.py --config=configs/convert.py --config.source=/ckpt/Llama-2-7b-hf \
      --config.dest=/ckpt/Llama-2-7b-longrope-128k --config.factors=/runs/search/factors.json

The source format is detected (HF config.json, Meta params.json + consolidated.*.pth, lrjax native
lrjax_config.json). Values that the chosen format does not use must stay at their defaults (an error otherwise).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = ""                   # checkpoint directory to read (required)
  c.dest = ""                     # directory to write (required; must not exist or be empty unless overwrite)
  c.format = "hf"                 # hf | meta | native
  c.dtype = ""                    # float32 | bfloat16 | float16; "" keeps the source's storage dtype
  c.max_shard_size = ""           # hf only: e.g. "5GB", "500MB", "20KB"; "" writes one model.safetensors
  c.factors = ""                  # factor file (lrjax JSON or official LongRoPE CSV) written into the config
  c.target_length = 0             # with factors: exported max_position_embeddings; 0 = the file's target_length
  c.original_length = 0           # with factors: pre-training window L; 0 = the file's, else the source's
  c.allow_dropping_n_hat = False  # hf only: export a LongRoPE setting with n̂ > 0 without n̂
  c.overwrite = False             # replace a non-empty dest (atomically, after the new one is complete)
  return c
