"""LongRoPE evolutionary search: `python experiments/search.py --config=configs/search.py:tiny --workdir=DIR`.

Writes factors.json (lrjax format), factors.csv (official LongRoPE form), rope_scaling_hf.json, generations.csv,
summary.json, factors.png and fitness.png into DIR; --config.resume=True continues an interrupted search.
--config.dry_run=True compiles the fitness program on the config's layout instead (no weights, no data).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import search
  if config.dry_run:
    from lrjax import dryrun
    search.validate_config(config)
    return dryrun.search_main(config)
  return search.describe(search.main(config, workdir))


if __name__ == "__main__":
  cli.main(run, default_config="configs/search.py:tiny")
