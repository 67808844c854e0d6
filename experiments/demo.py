"""The main job: `python experiments/demo.py` (or `bash run.sh demo`) on the built-in model and corpus.

A LongRoPE factor search at 8x the built-in model's window, then perplexity against length for plain RoPE,
PI, NTK, YaRN and the searched factors. Outputs (table, plots, factor files) go to --workdir; rerunning with
the same workdir reuses what is finished.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from absl import app
from absl import flags
from ml_collections import config_flags

from lrjax import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"),
    "demo config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "output directory")


def main(argv):
  del argv
  sys.exit(pipeline.main(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
