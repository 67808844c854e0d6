"""Perplexity vs length: `python experiments/evaluate.py --config=configs/evaluate.py --workdir=DIR`.

Rows are RoPE settings, columns evaluation lengths; writes results.csv, results.json (with per-window NLL),
table.txt and ppl.png into DIR. See configs/evaluate.py for the settings, data sources and protocols.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import evaluate
  out = evaluate.run(config, workdir)
  return "wrote " + ", ".join(out["files"].values())


if __name__ == "__main__":
  cli.main(run, default_config="configs/evaluate.py")
