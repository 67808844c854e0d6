"""Passkey retrieval (lrjax.passkey.run): settings x prompt lengths -> accuracy.

  python experiments/passkey.py --config=configs/passkey.py --workdir=/tmp/passkey
  python experiments/passkey.py --config=configs/passkey.py:smollm2 --workdir=experiments/results/smollm2/passkey

The paper's prompt (Mohtashami & Jaggi; needle uniformly placed, seed 42, the first integer of the greedy
continuation scored), `python` format for code models. Settings follow configs/evaluate.py's grammar.

Variants:
  (default)  built-in byte model, python format, 256..2048 tokens
  smollm2    SmolLM2-135M-Instruct (window 8192), paper format at 8k and 16k, 5 prompts each, for none, YaRN
             and the factors searched by configs/search.py:smollm2
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "builtin"              # "builtin", "smollm2", or a checkpoint
  c.tokenizer = "auto"
  c.dtype = "float32"
  c.attention = "blockwise"
  c.block_q = 512
  c.block_k = 512
  c.sliding_window = -1           # -1 = the checkpoint's, 0 = off (full causal attention), N = N tokens
  c.original_length = 0            # 0 = the model's original window
  c.lengths = (256, 512, 1024, 2048)
  c.settings = ("none", "yarn")
  c.samples = 10                   # prompts per length (paper: 10)
  c.seed = 42
  c.format = "python"              # paper | python
  c.max_new_tokens = 10
  c.policy = "total_length"        # total_length | reprefill (lrjax.decode)
  c.prefill_chunk = 0              # tokens per prefill step (prompts padded to whole chunks); 0 = one chunk
  c.progress = True
  if variant == "smollm2":
    c.model = "smollm2"
    c.format = "paper"
    c.lengths = (8192, 16384)
    c.samples = 5
    c.settings = ("none", "yarn", "longrope=experiments/results/smollm2/search_16k/factors.json")
  elif variant:
    raise ValueError(f"unknown passkey config variant {variant!r}; expected '' or 'smollm2'")
  return c
