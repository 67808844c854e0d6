"""Train or fine-tune: `python experiments/train.py --config=configs/pretrain.py --workdir=DIR`.

Resumes from DIR/checkpoints when it holds one. Bad input prints one line and exits 1.
With --config.dry_run=True it compiles every stage's sharded step on simulated devices instead (no weights, no
data) and prints per-device memory and FLOPs; a layout that does not fit config.device_memory_gb fails.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lrjax and configs

from lrjax import cli  # noqa: E402


def run(config, workdir):
  from lrjax import train
  if config.get("dry_run"):
    from lrjax import dryrun
    return dryrun.train_main(config)
  return train.describe(train.train(config, workdir))


if __name__ == "__main__":
  cli.main(run, default_config="configs/pretrain.py")
