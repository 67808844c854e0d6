"""LongRoPE evolutionary search: `python experiments/search.py --config=configs/search.py:tiny --workdir=DIR`.

Writes factors.json (lrjax format), factors.csv (official LongRoPE form), rope_scaling_hf.json, generations.csv,
summary.json, factors.png and fitness.png into DIR; --config.resume=True continues an interrupted search.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from ml_collections import config_flags

from lrjax import search

_CONFIG = config_flags.DEFINE_config_file("config", "configs/search.py:tiny", "search config")
_WORKDIR = flags.DEFINE_string("workdir", "", "output directory (holds the resumable search state)")


def main(argv):
  del argv
  try:
    if _CONFIG.value.dry_run:  # compile the fitness program on config.layout; no weights, no data
      from lrjax import dryrun
      search.validate_config(_CONFIG.value)
      print(dryrun.search_main(_CONFIG.value))
      return
    result = search.main(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # SearchError, FactorFileError, RopeError, ...: one clear line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  results = result if isinstance(result, dict) else {None: result}
  for length, r in results.items():
    if length == "scaling":
      continue
    seeds = ", ".join(f"{k} {v:.4g}" for k, v in r.seed_fitness.items())
    print(f"{r.workdir}: best fitness {r.fitness:.4g} (seeds: {seeds}); {r.evolution.evaluations} evaluations, "
          f"{r.evolution.generations} generations, {r.compilations} compilation(s), {r.seconds:.0f}s")


if __name__ == "__main__":
  app.run(main)
