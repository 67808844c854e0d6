"""The main job (`bash run.sh demo`): LongRoPE on the built-in model in a few minutes on 2 CPU cores.

  python experiments/demo.py [--workdir=runs/demo] [--config.search.search.iterations=6]

Searches rescale factors (and n̂) at 8x the 256-token window on builtin:valid, then prints perplexity on the
held-out builtin:test documents at 1x, 2x, 4x and 8x for plain RoPE, PI, NTK, YaRN and the searched factors,
and saves the plot (eval_base/ppl.png) and the factor curves (search_8x/factors.png). A smaller budget of the
same steps as configs/reproduce_tiny.py.
"""

import ml_collections

from configs import reproduce_tiny


def get_config() -> ml_collections.ConfigDict:
  c = reproduce_tiny.get_config()
  c.steps = ("search_8x", "eval_base")
  s = c.search.search
  s.population, s.iterations, s.parents, s.mutations, s.crossovers = 12, 3, 6, 4, 4
  c.evaluate.min_tokens = -1
  return c
