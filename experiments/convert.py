"""Checkpoint conversion between HF, Meta, GGUF (read) and native lrjax formats, optionally writing a factor file's
scaling into the exported config.

  python experiments/convert.py --config=configs/convert.py --config.source=SRC --config.dest=DEST \
      [--config.format=hf|meta|native] [--config.factors=factors.json] [--config.dtype=bfloat16]

Prints one summary line; on bad input prints one error line and exits 1, leaving any existing DEST untouched.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  del workdir
  from lrjax.weights import conversion
  return conversion.run(config)


if __name__ == "__main__":
  cli.main(run, default_config="configs/convert.py")
