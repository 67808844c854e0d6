"""Checkpoint conversion between HF, Meta and native lrjax formats, optionally writing a factor file's scaling.

  python experiments/convert.py --config=configs/convert.py --config.source=SRC --config.dest=DEST \
      [--config.format=hf|meta|native] [--config.factors=factors.json] [--config.dtype=bfloat16]

Prints one summary line; on bad input prints one error line and exits 1, leaving any existing DEST untouched.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import logging
from ml_collections import config_flags

from lrjax import factors
from lrjax import weights

_CONFIG = config_flags.DEFINE_config_file("config", "configs/convert.py", "conversion config", lock_config=True)


def run(c) -> str:
  """Validates the config (no value that nothing reads) and converts; returns the summary line."""
  if not c.source or not c.dest:
    raise weights.WeightsError("set --config.source and --config.dest")
  if c.format not in weights.FORMATS:
    raise weights.WeightsError(f"unknown format {c.format!r}; expected one of {', '.join(weights.FORMATS)}")
  if c.max_shard_size and c.format != "hf":
    raise weights.WeightsError("max_shard_size applies to format=hf only")
  if c.allow_dropping_n_hat and c.format != "hf":
    raise weights.WeightsError("allow_dropping_n_hat applies to format=hf only")
  if (c.target_length or c.original_length) and not c.factors:
    raise weights.WeightsError("target_length and original_length apply only together with factors")
  scaling, target = None, None
  if c.factors:
    loaded = factors.read(c.factors)
    scaling, target = loaded.scaling, c.target_length or loaded.target_length
    if c.original_length:
      scaling = scaling.replace(original_max_position_embeddings=c.original_length)
  return weights.convert(c.source, c.dest, format=c.format, dtype=c.dtype or None,
                         max_shard_bytes=weights.parse_size(c.max_shard_size) if c.max_shard_size else None,
                         scaling=scaling, target_length=target, overwrite=c.overwrite,
                         allow_dropping_n_hat=c.allow_dropping_n_hat)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    print(run(_CONFIG.value))
  except (ValueError, OSError) as e:  # WeightsError, FactorFileError, RopeError, I/O: one clear line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
