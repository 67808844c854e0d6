"""Documents -> one token stream -> fixed-length training blocks, with a resumable, host-split iterator.

Bookends: every document becomes `[bos] + tokens + [eos]` when the tokenizer defines BOS/EOS (the paper's
RedPajama recipe). A tokenizer without them (the byte tokenizer: all 256 ids are bytes) gets `separator`
appended after each document instead; the default separator for bytes is [0], the NUL byte, which never
occurs in text, so the model can still see where one document ends and the next begins.

Blocks: the stream is cut into consecutive, non-overlapping blocks of length + 1 tokens; a block's inputs are
tokens [0, length) and its targets tokens [1, length + 1). Every token of the stream lies in exactly one block;
the last block is padded (padding has loss weight 0). Positions restart at 0 in every block and attention
crosses document boundaries (no cross-document masking), as in the paper's fine-tuning data.

Order: epoch e visits every block once, in the permutation `default_rng([seed, e]).permutation(n_blocks)`.
A global batch is the next `global_batch` entries of that sequence (crossing into the next epoch when one
ends); process p of P keeps rows [p*B/P, (p+1)*B/P). The iterator's whole state is {"epoch", "position"}.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np


class PackingError(ValueError):
  """Data that cannot be packed (empty corpus, bad sizes); the message names the problem."""


def token_stream(documents: Iterable[Sequence[int]], *, bos: int | None = None, eos: int | None = None,
                 separator: Sequence[int] = ()) -> np.ndarray:
  """Concatenate tokenized documents with bookends.

  Args:
    documents: token-id sequences, one per document.
    bos, eos: prepended / appended to every document when not None.
    separator: appended to every document when eos is None (e.g. [0] for bytes); ignored when eos is set.
  Returns:
    i32[n] the whole stream.
  Raises:
    PackingError when there are no tokens at all.
  """
  pieces, n_docs = [], 0
  head = np.asarray([] if bos is None else [bos], np.int32)
  tail = np.asarray([eos] if eos is not None else list(separator), np.int32)
  for doc in documents:
    doc = np.asarray(doc, np.int32).reshape(-1)
    if doc.size == 0:
      continue
    n_docs += 1
    pieces += [head, doc, tail]
  if not n_docs:
    raise PackingError("the corpus has no tokens (no documents, or only empty ones)")
  return np.concatenate(pieces)


class PackedBlocks:
  """A token stream viewed as blocks of length + 1 tokens (the last one padded with weight 0)."""

  def __init__(self, stream: np.ndarray, length: int, pad_id: int = 0):
    if length < 1:
      raise PackingError(f"block length must be >= 1, got {length}")
    stream = np.asarray(stream, np.int32).reshape(-1)
    if stream.size < 2:
      raise PackingError(f"the token stream has {stream.size} tokens; a training block needs at least 2")
    self.length = length
    self.stream = stream
    self.num_blocks = -(-stream.size // (length + 1))
    self.pad_id = pad_id

  def blocks(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens i32[len(indices), length + 1] and validity bool[len(indices), length + 1]."""
    span = self.length + 1
    offsets = np.asarray(indices, np.int64)[:, None] * span + np.arange(span)[None, :]
    valid = offsets < self.stream.size
    tokens = np.where(valid, self.stream[np.minimum(offsets, self.stream.size - 1)], self.pad_id)
    return tokens.astype(np.int32), valid


def block_batch(tokens: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
  """Training arrays from blocks [b, t + 1]: inputs/targets/positions i32[b, t], weights f32[b, t]."""
  b, span = tokens.shape
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "positions": np.broadcast_to(np.arange(span - 1, dtype=np.int32), (b, span - 1)).copy(),
      "weights": valid[:, 1:].astype(np.float32),
  }


def epoch_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
  """The block order of one epoch (a permutation, reproducible from (seed, epoch))."""
  return np.random.default_rng([seed, epoch]).permutation(num_blocks)


class BatchIterator(Iterator[dict]):
  """Endless iterator of this process's rows of each global batch (numpy dicts as `block_batch`).

  Args:
    packed: the blocks.
    global_batch: sequences per global batch (all processes together).
    seed: shuffling seed.
    process_index, process_count: this process's slice (default: jax's).
    state: {"epoch", "position"} to resume from (default: the start).
  """

  def __init__(self, packed: PackedBlocks, global_batch: int, seed: int, *, process_index: int | None = None,
               process_count: int | None = None, state: dict | None = None):
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch < 1 or global_batch % process_count:
      raise PackingError(f"global batch {global_batch} must be a positive multiple of the process count "
                         f"{process_count}")
    self.packed, self.global_batch, self.seed = packed, global_batch, seed
    self.process_index, self.process_count = process_index, process_count
    state = state or {"epoch": 0, "position": 0}
    unknown = set(state) - {"epoch", "position"}
    if unknown:
      raise PackingError(f"unknown data-iterator state keys {sorted(unknown)}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    if not 0 <= self.position < packed.num_blocks or self.epoch < 0:
      raise PackingError(f"data-iterator state {state} does not fit a corpus of {packed.num_blocks} blocks")
    self._order = epoch_order(packed.num_blocks, seed, self.epoch)

  def state(self) -> dict:
    """{"epoch", "position"}: enough to resume exactly here (JSON-serialisable)."""
    return {"epoch": self.epoch, "position": self.position}

  def _next_indices(self, n: int) -> np.ndarray:
    out = []
    while n:
      take = min(n, self.packed.num_blocks - self.position)
      out.append(self._order[self.position:self.position + take])
      self.position += take
      n -= take
      if self.position == self.packed.num_blocks:
        self.epoch, self.position = self.epoch + 1, 0
        self._order = epoch_order(self.packed.num_blocks, self.seed, self.epoch)
    return np.concatenate(out)

  def __next__(self) -> dict:
    indices = self._next_indices(self.global_batch)
    per = self.global_batch // self.process_count
    mine = indices[self.process_index * per:(self.process_index + 1) * per]
    return block_batch(*self.packed.blocks(mine))
