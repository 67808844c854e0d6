"""Perplexity vs length: `python experiments/evaluate.py --config=configs/evaluate.py --workdir=DIR`.

Rows are RoPE settings, columns evaluation lengths; writes results.csv, results.json (with per-window NLL),
table.txt and ppl.png into DIR. See configs/evaluate.py for the settings, data sources and protocols.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax from this checkout

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lrjax import evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/evaluate.py", "evaluation config")
_WORKDIR = flags.DEFINE_string("workdir", "", "output directory")


def main(argv):
  del argv
  try:
    out = evaluate.run(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # EvalError, DataError, TokenizerError, WeightsError, RopeError, ...: one clear line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print("wrote " + ", ".join(out["files"].values()))


if __name__ == "__main__":
  app.run(main)
