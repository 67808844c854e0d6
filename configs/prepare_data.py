"""Tokenize a corpus once into prepared token records (lrjax.records) for the streaming input (lrjax.stream).

  python experiments/prepare_data.py --config=configs/prepare_data.py --config.source=builtin:train \
      --workdir=/tmp/records/builtin_train
  python experiments/prepare_data.py --config=configs/prepare_data.py:llama2 \
      --config.source=/data/redpajama_book.parquet?field=text --workdir=gs://bucket/records/book

Variants:
  (default)  the byte tokenizer (the built-in model's)
  llama2     the LLaMA 2 SentencePiece tokenizer (set its path); 64 documents per shard (long books)

Rerunning the same command after an interruption continues it (completed shards are kept); a different
source or setting into the same --workdir is refused.
"""

import os

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = "builtin:train"     # any lrjax.data source: builtin:SPLIT, FILE.jsonl[.gz][?field=], FILE.parquet
  #                                [?field=], FILE.txt, DIR[?pattern=], tfds:NAME?split=&data_dir=&field=
  c.tokenizer = "byte"           # "byte", a tokenizer.json / tokenizer.model file, or a directory holding one
  c.max_documents = 0            # 0 = every document; N = the first N (quick runs)
  c.shard_documents = 1024       # documents per shard
  c.num_workers = max(1, (os.cpu_count() or 2) - 1)  # tokenizing processes (0 = in the main process)
  c.progress = True              # tqdm bar over documents
  if variant == "llama2":
    c.tokenizer = "/path/to/Llama-2-7b-hf/tokenizer.model"
    c.shard_documents = 64
  elif variant:
    raise ValueError(f"unknown configs/prepare_data.py variant {variant!r} (expected '' or 'llama2')")
  return c
