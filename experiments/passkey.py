"""Passkey retrieval: `python experiments/passkey.py --config=configs/passkey.py --workdir=DIR`.

Writes table.txt, results.json (every answer) and passkey.png into DIR.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import passkey
  passkey.run(config, workdir)


if __name__ == "__main__":
  cli.main(run, default_config="configs/passkey.py")
