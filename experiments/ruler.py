"""RULER: `python experiments/ruler.py --config=configs/ruler.py[:VARIANT] --workdir=DIR`.

Writes into DIR samples.jsonl (every answer; a rerun resumes from it), table.txt / table.md, tasks/TASK.csv,
results.json and heat maps (heatmap*.png, needle_*.png for needle grids); see lrjax.ruler.results.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import ruler
  ruler.run(config, workdir)


if __name__ == "__main__":
  cli.main(run, default_config="configs/ruler.py")
