"""The whole LongRoPE method on the built-in model, in one command (lrjax.pipeline):

  python experiments/reproduce.py --config=configs/reproduce_tiny.py --workdir=experiments/results/reproduce_tiny
  python experiments/reproduce.py --config=configs/reproduce_tiny.py:smoke --workdir=/tmp/smoke   # CI-sized

Built-in model: byte-level LLaMA pretrained at a 256-token window. Target 8x = 2048 tokens; second stage 64x =
16384 tokens; recovery at 256 and 512 tokens. Search fitness on builtin:valid, reported figures on
builtin:test (held out from pretraining, fine-tuning and search).
"""

import ml_collections

from configs import evaluate as evaluate_configs
from configs import finetune as finetune_configs
from configs import search as search_configs
from lrjax.pipeline import STEPS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "builtin"
  c.steps = STEPS
  c.target_length = 2048        # 8x the window: search and fine-tune here
  c.second_length = 16384       # 64x: the progressive second search, without fine-tuning

  c.search = search_configs.get_config("tiny")
  c.search.search.population, c.search.search.iterations = 24, 8
  c.search.search.mutations, c.search.search.crossovers, c.search.search.parents = 8, 8, 12
  c.second = search_configs.get_config("tiny_second")
  c.second.search.population, c.second.search.iterations = 6, 2
  c.second.search.mutations, c.second.search.crossovers, c.second.search.parents = 2, 2, 3
  c.second.search.candidates_per_call = 2
  c.second.search.doc_batch = 1
  c.second.data.num_documents = 2
  c.recovery = search_configs.get_config("tiny_short")
  c.recovery.search.population, c.recovery.search.iterations = 12, 4
  c.recovery.search.mutations, c.recovery.search.crossovers, c.recovery.search.parents = 4, 4, 6

  c.finetune = finetune_configs.get_config("tiny")
  c.finetune.stages[0].steps = 100
  c.finetune.checkpoint_every = 50

  c.evaluate = evaluate_configs.get_config()
  c.evaluate.num_documents = 8
  c.evaluate.min_tokens = 16384    # the same 8 documents at every length, 64x included
  c.evaluate.progress = False

  c.passkey = ml_collections.ConfigDict(dict(lengths=(256, 512, 1024, 2048), samples=10, seed=42,
                                             format="python", max_new_tokens=8))
  for s in (c.search, c.second, c.recovery):
    s.progress = False
  if arg == "smoke":  # every step, tiny budgets: seconds per step (CI)
    c.target_length, c.second_length = 512, 1024
    for s in (c.search, c.second, c.recovery):
      s.search.population, s.search.iterations = 4, 1
      s.search.mutations, s.search.crossovers, s.search.parents = 1, 1, 2
      s.search.candidates_per_call = 2
      s.search.doc_batch = 1
      s.data.num_documents = 1
    c.recovery.short_lengths = (256,)
    c.finetune.stages[0].steps = 2
    c.finetune.stages[0].warmup_steps = 1
    c.finetune.batch_size = 8  # divisible by the 8 simulated devices of the tests
    c.finetune.checkpoint_every = 2
    c.finetune.peak_flops = 1e9
    c.evaluate.num_documents = 1
    c.passkey.lengths, c.passkey.samples = (256,), 2
  elif arg:
    raise ValueError(f"unknown reproduce_tiny variant {arg!r}; expected '' or 'smoke'")
  return c
