"""Prepare token records: `python experiments/prepare_data.py --config=configs/prepare_data.py --workdir=OUT`.

Reads --config.source, tokenizes it with --config.num_workers processes into shards under OUT (any
etils.epath location) and writes OUT/manifest.json last. Rerun the same command to continue an interrupted
run. Bad input prints one line and exits 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from ml_collections import config_flags

from lrjax import records

_CONFIG = config_flags.DEFINE_config_file("config", "configs/prepare_data.py", "prepare config")
_WORKDIR = flags.DEFINE_string("workdir", "", "output directory: the prepared records")


def main(argv):
  del argv
  c = _CONFIG.value
  try:
    if not _WORKDIR.value:
      raise records.RecordsError("--workdir (the output directory) is required")
    manifest = records.prepare(c.source, _WORKDIR.value, tokenizer=c.tokenizer, shard_documents=c.shard_documents,
                               num_workers=c.num_workers, max_documents=c.max_documents or None,
                               progress=c.progress)
  except ValueError as e:  # RecordsError, DataError, TokenizerError: one clear line
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  print(f"{_WORKDIR.value}: {manifest['documents']} documents, {manifest['tokens']} tokens in "
        f"{len(manifest['shards'])} shards (tokenizer {manifest['tokenizer']['spec']}, "
        f"vocab {manifest['tokenizer']['vocab_size']})")


if __name__ == "__main__":
  app.run(main)
