"""The main job: `python experiments/demo.py` (or `bash run.sh demo`) on the built-in model and corpus.

A LongRoPE factor search at 8x the built-in model's window, then perplexity against length for plain RoPE,
PI, NTK, YaRN and the searched factors. Outputs (table, plots, factor files) go to --workdir; rerunning with
the same workdir reuses what is finished.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import pipeline
  pipeline.run_pipeline(config, workdir)


if __name__ == "__main__":
  cli.main(run, default_config="configs/demo.py", default_workdir="runs/demo")
