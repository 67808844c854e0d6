"""The whole LongRoPE pipeline: `python experiments/reproduce.py --config=configs/reproduce_tiny.py --workdir=DIR`.

Rerunning with the same workdir resumes: finished steps are skipped, an interrupted search or fine-tuning
continues from its saved state.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from absl import app
from absl import flags
from ml_collections import config_flags

from lrjax import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce_tiny.py", "pipeline config")
_WORKDIR = flags.DEFINE_string("workdir", "experiments/results/reproduce_tiny", "output directory")


def main(argv):
  del argv
  sys.exit(pipeline.main(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
