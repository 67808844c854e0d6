"""The training input: documents packed on the fly into [rows, length] batches for one data-parallel shard.

Documents come from prepared records (lrjax.records.Records) or from memory (`InMemoryDocuments`, e.g. an
lrjax.data source tokenized at start-up); one pipeline serves both. Only O(#documents) index data is held;
tokens are read per batch.

Bookends (as lrjax.packing): every document becomes `[bos] + tokens + [eos]` when the tokenizer has BOS/EOS;
without EOS `separator` (default [0], the NUL byte, for the byte tokenizer) follows each document instead. A
document's "packed length" is its token count plus bookends; length filters and `original_length` use it.
Empty documents are skipped.

Order: component c's epoch e is `default_rng([seed, 0, c, e]).permutation(n)` of its n documents that pass
its length filters; shard s of S takes entries s, s + S, ... of it (index sharding), and its token stream is
its documents of epoch 0, then of epoch 1, ..., bookended and concatenated. Row r of the shard's stream is
tokens [r * length, (r + 1) * length + 1): inputs are the first `length`, targets the last `length`, so every
token is an input exactly once per epoch and every next-token transition a target exactly once (rows overlap
by one token; a document split across rows loses nothing).

Mixtures: each row of global batch k (rows = global_batch / shard_count per shard; shard s owns rows
[s * rows, (s + 1) * rows)) comes from component c with probability weight_c / sum(weights), drawn with
`default_rng([seed, 1, k // 256]).random((256, global_batch))`; a component's rows take its stream's next rows.

Batch k is a pure function of k, so the iterator state is {"batch": k, "plan": fingerprint}, equal on every
shard, and grain's multiprocessing prefetch (workers compute batches k = w, w + W, ... and grain interleaves
them back in order) yields exactly what num_workers=0 yields.

Batch fields, all [rows, length]:
  inputs, targets   i32 token ids
  positions         i32: 0..length-1, or with reset_positions each token's offset in its (bookended) document,
                    continuing across a document split over two rows; 0 on padding
  segment_ids       i32: 1, 2, ... per document within the row; 0 on padding
  weights           f32: 0 where the target is padding and, with document_mask, where the target belongs to
                    another document than the input (the cross-boundary prediction); else 1
  original_rope     bool (only with original_length): the token's document has packed length <=
                    original_length (LongRoPE2 mixed context-window training: those documents use the original
                    RoPE and a document mask)
Padding appears only after the last epoch of a finite pass (num_epochs), which also pads the last batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Iterator, Sequence

import grain
import numpy as np
from absl import flags
from etils import epath

from lrjax import data as data_lib
from lrjax import records as records_lib

MIX_CHUNK = 256  # batches per mixture draw
_COMPONENT_KEYS = {"path", "weight", "min_tokens", "max_tokens"}


class StreamError(ValueError):
  """A pipeline setting or input that cannot work; the message names the problem."""


class InMemoryDocuments:
  """Token arrays held in memory, behind the same interface as lrjax.records.Records.

  Args:
    documents: token-id sequences, one per document (no bookends).
    bos_id, eos_id: the tokenizer's (None when it has none).
    name: for messages.
  """

  def __init__(self, documents: Sequence[Sequence[int]], *, bos_id: int | None = None,
               eos_id: int | None = None, name: str = "in-memory documents"):
    arrays = [np.asarray(d, np.int32).reshape(-1) for d in documents]
    self.lengths = np.array([a.size for a in arrays], np.int64)
    self._tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    self._starts = np.concatenate([[0], np.cumsum(self.lengths)])
    self.bos_id, self.eos_id, self.name = bos_id, eos_id, name
    h = hashlib.sha256(self.lengths.tobytes())
    h.update(self._tokens.tobytes())
    self.fingerprint = h.hexdigest()[:16]

  @classmethod
  def from_source(cls, source: str, tokenizer, *, max_documents: int | None = None) -> InMemoryDocuments:
    """An lrjax.data source tokenized now (the bookends are added when packing)."""
    docs = data_lib.tokenized_documents(source, tokenizer, max_documents=max_documents, add_bos=False)
    return cls(docs, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, name=str(source))

  def __len__(self) -> int:
    return self.lengths.shape[0]

  def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """i32 tokens [start, stop) of document `doc`."""
    stop = int(self.lengths[doc]) if stop is None else stop
    return self._tokens[self._starts[doc] + start:self._starts[doc] + stop]


Documents = records_lib.Records | InMemoryDocuments


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a mixture: documents, a sampling weight and packed-length filters (inclusive)."""
  documents: Documents
  weight: float = 1.0
  min_tokens: int = 0
  max_tokens: int | None = None


def open_component(spec: str | dict, tokenizer=None) -> Component:
  """A Component from "PATH" or {path, weight, min_tokens, max_tokens}.

  PATH is a prepared directory (it holds manifest.json; checked against `tokenizer` when given) or else an
  lrjax.data source, tokenized now with `tokenizer` (required then).
  """
  spec = {"path": spec} if isinstance(spec, str) else dict(spec)
  unknown = set(spec) - _COMPONENT_KEYS
  if unknown or "path" not in spec:
    raise StreamError(f"data component {spec}: expected keys {sorted(_COMPONENT_KEYS)} with path required")
  path = str(spec.pop("path"))
  if epath.Path(path, "manifest.json").exists():
    docs = records_lib.Records(path, tokenizer=tokenizer)
  elif tokenizer is None:
    raise StreamError(f"data component {path!r} is not a prepared directory; tokenizing it needs a tokenizer")
  else:
    docs = InMemoryDocuments.from_source(path, tokenizer)
  return Component(docs, **spec)


class _ShardStream:
  """One component's endless token stream for one shard (see the module docstring)."""

  def __init__(self, component: Component, index: int, head: np.ndarray, tail: np.ndarray, seed: int,
               shard_index: int, shard_count: int):
    c = component
    self.docs, self.head, self.tail = c.documents, head, tail
    blen = c.documents.lengths + head.size + tail.size
    keep = (c.documents.lengths > 0) & (blen >= c.min_tokens)
    if c.max_tokens is not None:
      keep &= blen <= c.max_tokens
    self.kept = np.flatnonzero(keep)
    if self.kept.size < shard_count:
      raise StreamError(f"{c.documents.name}: {self.kept.size} documents with packed length in "
                        f"[{c.min_tokens}, {c.max_tokens}] (of {len(c.documents)}), fewer than the "
                        f"{shard_count} shards")
    self.blen = blen
    self.key, self.shard = (seed, 0, index), (shard_index, shard_count)
    self.per_epoch = len(range(shard_index, self.kept.size, shard_count))  # documents per epoch, this shard
    self._cache: dict = {}
    self._starts = [0]  # stream offset where epoch e starts

  def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(document ids, cumulative packed-length ends within the epoch) of this shard's epoch e."""
    if e not in self._cache:
      order = np.random.default_rng([*self.key, e]).permutation(self.kept.size)[self.shard[0]::self.shard[1]]
      docs = self.kept[order]
      if len(self._cache) >= 2:  # batches advance monotonically: the current and the next epoch suffice
        self._cache.pop(min(self._cache))
      self._cache[e] = (docs, np.cumsum(self.blen[docs]))
    return self._cache[e]

  def epoch_start(self, e: int) -> int:
    while len(self._starts) <= e:
      self._starts.append(self._starts[-1] + int(self.epoch(len(self._starts) - 1)[1][-1]))
    return self._starts[e]

  def _bookended(self, doc: int, p0: int, p1: int) -> np.ndarray:
    """Tokens [p0, p1) of `doc` with its bookends."""
    h, n = self.head.size, int(self.docs.lengths[doc])
    parts = [self.head[p0:p1]]
    if max(p0 - h, 0) < min(p1 - h, n):
      parts.append(self.docs.read(doc, max(p0 - h, 0), min(p1 - h, n)))
    parts.append(self.tail[max(p0 - h - n, 0):max(p1 - h - n, 0)])
    return np.concatenate(parts)

  def gather(self, a: int, b: int, end: int | None) -> dict[str, np.ndarray]:
    """Stream tokens [a, b) (padding from `end` on) with, per token, its document's serial number in the
    stream, its offset in the bookended document and that document's packed length."""
    n = b - a
    out = {"tokens": np.zeros(n, np.int32), "serial": np.full(n, -1, np.int64), "pos": np.zeros(n, np.int32),
           "dlen": np.zeros(n, np.int64), "valid": np.zeros(n, bool)}
    o, b = a, b if end is None else min(b, end)
    while o < b:
      e = int(np.searchsorted(self._starts, o, side="right")) - 1
      while self.epoch_start(e + 1) <= o:
        e += 1
      docs, ends = self.epoch(e)
      base = self.epoch_start(e)
      j = int(np.searchsorted(ends, o - base, side="right"))
      while j < docs.size and o < b:
        start = base + (int(ends[j - 1]) if j else 0)
        p0, p1 = o - start, min(int(ends[j]) + base, b) - start
        sl = slice(o - a, o - a + p1 - p0)
        out["tokens"][sl] = self._bookended(int(docs[j]), p0, p1)
        out["serial"][sl] = e * self.per_epoch + j
        out["pos"][sl] = np.arange(p0, p1)
        out["dlen"][sl] = self.blen[docs[j]]
        out["valid"][sl] = True
        o += p1 - p0
        j += 1
    return out


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static batch structure."""
  length: int
  rows: int
  shard_index: int
  shard_count: int
  reset_positions: bool
  document_mask: bool
  original_length: int | None


class _Plan:
  """batch k of this shard as a pure function of k (picklable: grain ships it to its worker processes)."""

  def __init__(self, streams: list[_ShardStream], weights: np.ndarray, layout: _Layout, seed: int,
               num_epochs: int | None):
    self.streams, self.layout, self.seed = streams, layout, seed
    self.cdf = np.cumsum(weights) / np.sum(weights)
    self.end = None if num_epochs is None else streams[0].epoch_start(num_epochs)
    rows_total = None if self.end is None else -(-self.end // layout.length)
    self.num_batches = None if rows_total is None else -(-rows_total // layout.rows)
    self._prefix = [np.zeros(len(streams), np.int64)]  # rows per component before chunk c
    self._chunk: tuple[int, np.ndarray] | None = None

  def _choices(self, c: int) -> np.ndarray:
    """i64[MIX_CHUNK, rows]: the component of each of this shard's rows in batches of chunk c."""
    if self._chunk is None or self._chunk[0] != c:
      u = np.random.default_rng([self.seed, 1, c]).random((MIX_CHUNK, self.layout.rows * self.layout.shard_count))
      mine = u[:, self.layout.shard_index * self.layout.rows:(self.layout.shard_index + 1) * self.layout.rows]
      self._chunk = (c, np.minimum(np.searchsorted(self.cdf, mine, side="right"), len(self.streams) - 1))
    return self._chunk[1]

  def _mix(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows each component served before batch k, the component of each row of batch k)."""
    rows, n = self.layout.rows, len(self.streams)
    if n == 1:
      return np.array([k * rows]), np.zeros(rows, np.int64)
    c, r = divmod(k, MIX_CHUNK)
    while len(self._prefix) <= c:
      counts = np.bincount(self._choices(len(self._prefix) - 1).ravel(), minlength=n)
      self._prefix.append(self._prefix[-1] + counts)
    choices = self._choices(c)
    return self._prefix[c] + np.bincount(choices[:r].ravel(), minlength=n), choices[r]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    lay = self.layout
    before, source = self._mix(k)
    span = lay.length + 1
    fields = {"tokens": np.zeros((lay.rows, span), np.int32), "serial": np.full((lay.rows, span), -1, np.int64),
              "pos": np.zeros((lay.rows, span), np.int32), "dlen": np.zeros((lay.rows, span), np.int64),
              "valid": np.zeros((lay.rows, span), bool)}
    for c, stream in enumerate(self.streams):
      mine = np.flatnonzero(source == c)
      if mine.size:  # this component's rows are consecutive rows of its stream: one contiguous read
        a = int(before[c]) * lay.length
        got = stream.gather(a, a + mine.size * lay.length + 1, self.end)
        take = np.arange(mine.size)[:, None] * lay.length + np.arange(span)
        for name, value in got.items():
          fields[name][mine] = value[take]
    return self._batch(fields)

  def _batch(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lay = self.layout
    valid_in, serial_in = f["valid"][:, :-1], f["serial"][:, :-1]
    weights = f["valid"][:, 1:]
    if lay.document_mask:
      weights = weights & (f["serial"][:, 1:] == serial_in)
    if lay.reset_positions:
      positions = np.where(valid_in, f["pos"][:, :-1], 0)
    else:
      positions = np.broadcast_to(np.arange(lay.length, dtype=np.int32), valid_in.shape)
    batch = {"inputs": f["tokens"][:, :-1], "targets": f["tokens"][:, 1:],
             "positions": np.ascontiguousarray(positions, np.int32),
             "segment_ids": np.where(valid_in, serial_in - serial_in[:, :1] + 1, 0).astype(np.int32),
             "weights": weights.astype(np.float32)}
    if lay.original_length is not None:
      batch["original_rope"] = valid_in & (f["dlen"][:, :-1] <= lay.original_length)
    return {k: np.ascontiguousarray(v) for k, v in batch.items()}


class Batches(Iterator[dict]):
  """This shard's batches (numpy dicts, see the module docstring) through a grain pipeline; `state()` resumes.

  Use `batches(...)` to build one. Close it (or use it as a context manager) to stop prefetch workers.
  """

  def __init__(self, plan: _Plan, fingerprint: str, start: int, num_workers: int, worker_buffer_size: int):
    self.plan, self.fingerprint, self._next = plan, fingerprint, start
    stop = sys.maxsize if plan.num_batches is None else max(plan.num_batches, start)
    ds = grain.MapDataset.range(start, stop).map(plan)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if num_workers:
      if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads absl flags when starting workers
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=worker_buffer_size))
    self._it = iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._next += 1
    return batch

  def state(self) -> dict:
    """{"batch", "plan"}: JSON-serialisable, the same on every shard; `batches(..., state=)` resumes here."""
    return {"batch": self._next, "plan": self.fingerprint}

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _bookends(docs: Documents, separator: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
  head = [] if docs.bos_id is None else [docs.bos_id]
  if docs.eos_id is not None:
    tail = [docs.eos_id]
  else:
    tail = [0] if separator is None else list(separator)
  return np.asarray(head, np.int32), np.asarray(tail, np.int32)


def batches(components: Sequence[Component], *, length: int, global_batch: int, seed: int, shard_index: int = 0,
            shard_count: int = 1, reset_positions: bool = False, document_mask: bool = False,
            original_length: int | None = None, separator: Sequence[int] | None = None,
            num_epochs: int | None = None, num_workers: int = 0, worker_buffer_size: int = 2,
            state: dict | None = None) -> Batches:
  """The batches of data-parallel shard `shard_index` of `shard_count` (see the module docstring).

  Args:
    components: the sources (one, or a weighted mixture).
    length: tokens per row (the stage length).
    global_batch: rows per global batch, all shards together; each shard yields global_batch / shard_count.
    seed: shuffling and mixture seed (give each stage its own).
    shard_index, shard_count: this row shard (processes sharing rows pass the same index).
    reset_positions, document_mask, original_length: the positions / weights / original_rope fields.
    separator: appended to every document when the tokenizer has no EOS (default [0]).
    num_epochs: None for an endless stream; else stop after this many epochs (one component only).
    num_workers: grain prefetch processes (0: batches are computed in this process, when asked for).
    worker_buffer_size: batches each worker keeps ready.
    state: a `Batches.state()` to resume from.
  Raises:
    StreamError with a one-line message for settings that cannot work.
  """
  if not components:
    raise StreamError("no data components")
  if length < 1 or global_batch < 1 or shard_count < 1 or global_batch % shard_count:
    raise StreamError(f"need length >= 1 and a global batch ({global_batch}) divisible by the shard count "
                      f"({shard_count}); length is {length}")
  if not 0 <= shard_index < shard_count:
    raise StreamError(f"shard_index {shard_index} is not in [0, {shard_count})")
  if original_length is not None and not reset_positions:
    raise StreamError("original_length (original RoPE for short documents) needs reset_positions=True")
  if num_epochs is not None and (num_epochs < 1 or len(components) > 1):
    raise StreamError(f"num_epochs={num_epochs}: a finite pass needs num_epochs >= 1 and one component")
  if num_workers < 0 or worker_buffer_size < 1:
    raise StreamError(f"num_workers {num_workers} must be >= 0 and worker_buffer_size {worker_buffer_size} >= 1")
  for c in components:
    if not c.weight > 0 or c.min_tokens < 0 or (c.max_tokens is not None and c.max_tokens < c.min_tokens):
      raise StreamError(f"{c.documents.name}: weight must be > 0 and 0 <= min_tokens <= max_tokens; got "
                        f"{c.weight}, {c.min_tokens}, {c.max_tokens}")
  marks = {(c.documents.bos_id, c.documents.eos_id) for c in components}
  if len(marks) > 1:
    raise StreamError(f"components disagree on the tokenizer's (BOS, EOS) ids: {sorted(marks, key=str)}")
  head, tail = _bookends(components[0].documents, separator)
  streams = [_ShardStream(c, i, head, tail, seed, shard_index, shard_count) for i, c in enumerate(components)]
  layout = _Layout(length, global_batch // shard_count, shard_index, shard_count, reset_positions,
                   document_mask, original_length)
  plan = _Plan(streams, np.array([c.weight for c in components], np.float64), layout, seed, num_epochs)
  fingerprint = hashlib.sha256(json.dumps({
      "seed": seed, "length": length, "global_batch": global_batch, "shard_count": shard_count,
      "num_epochs": num_epochs, "head": head.tolist(), "tail": tail.tolist(),
      "components": [[c.documents.fingerprint, c.weight, c.min_tokens, c.max_tokens] for c in components]},
      sort_keys=True).encode()).hexdigest()[:16]
  start = 0
  if state is not None:
    if set(state) != {"batch", "plan"} or state["plan"] != fingerprint or int(state["batch"]) < 0:
      raise StreamError(f"data-iterator state {state} is not from this pipeline (plan {fingerprint}: same "
                        "sources, seed, length, global batch and shard count)")
    start = int(state["batch"])
  return Batches(plan, fingerprint, start, num_workers, worker_buffer_size)
