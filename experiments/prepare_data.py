"""Prepare token records: `python experiments/prepare_data.py --config=configs/prepare_data.py --workdir=OUT`.

Reads --config.source, tokenizes it with --config.num_workers processes into shards under OUT (any
etils.epath location) and writes OUT/manifest.json last. Rerun the same command to continue an interrupted
run. Bad input prints one line and exits 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import records
  return records.run(config, workdir)


if __name__ == "__main__":  # the guard matters: tokenizer workers are spawned processes that import this file
  cli.main(run, default_config="configs/prepare_data.py")
