"""Resumable per-prompt answers of an evaluation run (RULER, passkey): append-only JSONL plus a run identity.

samples.jsonl holds one JSON record per answered prompt, appended and fsynced as soon as it is scored, keyed by
(task, length, depth, index, rope): the prompt and the RoPE arrays the model ran with, so settings whose arrays
coincide (every derived method within the original window) share their records. run.json holds the identity of
the run (model, tokenizer, seed, prompt format, ...); a workdir whose identity differs is refused rather than
mixed. A rerun with the same workdir answers only the prompts that have no record.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lrjax import report

RECORDS, IDENTITY = "samples.jsonl", "run.json"

Key = tuple  # (task, length, depth, index, rope)


def record_key(task: str, length: int, depth: float | None, index: int, rope: str) -> Key:
  return task, int(length), None if depth is None else float(depth), int(index), rope


def rope_digest(model_config, scaling, seq_lens: Sequence[int]) -> str:
  """A digest of the RoPE arrays a decode uses at each of `seq_lens` (tokens): equal digests, equal answers."""
  digest = hashlib.sha1()
  for n in seq_lens:
    for array in model_config.rope_arrays(scaling, seq_len=int(n)):
      array = np.asarray(array)
      digest.update(f"{array.dtype}{array.shape}".encode())
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


class Store:
  """The records of a workdir: read once on opening, appended one line per record (a kill loses only the
  record being written; a torn last line is dropped on the next open).

  Args:
    identity: JSON-able settings that change answers; must equal the workdir's run.json when it has one.
    error: the exception class raised for a workdir holding another run.
  """

  def __init__(self, workdir: str, identity: Mapping[str, Any], error: type[Exception] = ValueError):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, RECORDS)
    identity = json.loads(json.dumps(dict(identity)))  # tuples -> lists, as read back
    identity_path = os.path.join(workdir, IDENTITY)
    if os.path.exists(identity_path):
      with open(identity_path, encoding="utf-8") as f:
        stored = json.load(f)
      changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
      if changed:
        k = changed[0]
        raise error(f"{workdir} holds a run with {k}={stored.get(k)!r}, not {identity.get(k)!r}; use another "
                    "--workdir (or delete it) to start a new run")
    else:
      report.write_json(identity_path, identity)
    self.records: dict[Key, dict] = {}
    if os.path.exists(self.path):
      with open(self.path, "rb") as f:
        data = f.read()
      complete = data[:data.rfind(b"\n") + 1]
      if len(complete) < len(data):  # the process died mid-line
        with open(self.path, "r+b") as f:
          f.truncate(len(complete))
      for line in complete.decode("utf-8").splitlines():
        if line.strip():
          r = json.loads(line)
          self.records[record_key(r["task"], r["length"], r["depth"], r["index"], r["rope"])] = r

  def get(self, key: Key) -> dict | None:
    return self.records.get(key)

  def add(self, records: Iterable[dict]) -> None:
    records = list(records)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write("".join(json.dumps(r) + "\n" for r in records))
      f.flush()
      os.fsync(f.fileno())
    for r in records:
      self.records[record_key(r["task"], r["length"], r["depth"], r["index"], r["rope"])] = r
