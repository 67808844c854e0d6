"""Train or fine-tune: `python experiments/train.py --config=configs/pretrain.py --workdir=DIR`.

Resumes from DIR/checkpoints when it holds one. Bad input prints one line and exits 1.
With --config.dry_run=True it compiles every stage's sharded step on simulated devices instead (no weights, no
data) and prints per-device memory and FLOPs; a layout that does not fit config.device_memory_gb fails.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

from lrjax import train

config_flags.DEFINE_config_file("config", None, "a configs/*.py file (optionally file.py:variant)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics.csv and TensorBoard events go here")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    if flags.FLAGS.config.get("dry_run"):
      from lrjax import dryrun
      print(dryrun.train_main(flags.FLAGS.config))
      return
    if not flags.FLAGS.workdir:
      raise train.TrainError("--workdir is required")
    out = train.train(flags.FLAGS.config, flags.FLAGS.workdir)
  except ValueError as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {out['step']}, loss {out['loss']:.4f} nats/token "
        f"({out['loss'] / 0.6931471805599453:.4f} bits), skipped {out['skipped']}"
        + (" (preempted)" if out["preempted"] else ""))


if __name__ == "__main__":
  app.run(main)
