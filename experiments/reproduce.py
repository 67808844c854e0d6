"""The whole LongRoPE pipeline: `python experiments/reproduce.py --config=configs/reproduce_tiny.py --workdir=DIR`.

Rerunning with the same workdir resumes: finished steps are skipped, an interrupted search or fine-tuning
continues from its saved state.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import pipeline
  pipeline.run_pipeline(config, workdir)


if __name__ == "__main__":
  cli.main(run, default_config="configs/reproduce_tiny.py", default_workdir="experiments/results/reproduce_tiny")
