"""Packing: bookends, every token exactly once, shuffling, host split, resumable iterator state."""

import numpy as np
import pytest

from lrjax import packing


def test_bookends_and_separator():
  docs = [[5, 6], [], [7]]
  np.testing.assert_array_equal(packing.token_stream(docs, bos=1, eos=2), [1, 5, 6, 2, 1, 7, 2])
  # No EOS (byte tokenizer): the separator follows every document.
  np.testing.assert_array_equal(packing.token_stream(docs, separator=[0]), [5, 6, 0, 7, 0])
  # EOS wins over the separator.
  np.testing.assert_array_equal(packing.token_stream(docs, eos=9, separator=[0]), [5, 6, 9, 7, 9])


def test_empty_corpus_is_one_clear_error():
  with pytest.raises(packing.PackingError, match="no tokens"):
    packing.token_stream([[], []])


def _epoch_blocks(stream, length, batch, seed, process_count=1):
  """All (tokens, valid) rows of one epoch, gathered over processes, in the order they are served."""
  packed = packing.PackedBlocks(stream, length)
  iters = [packing.BatchIterator(packed, batch, seed, process_index=p, process_count=process_count)
           for p in range(process_count)]
  rows = []
  n_batches = -(-packed.num_blocks // batch)
  for _ in range(n_batches):
    for it in iters:
      rows.append(next(it))
  return packed, rows


@pytest.mark.parametrize("n,length", [(1000, 15), (64, 15), (7, 3)])
def test_every_token_exactly_once(n, length):
  stream = np.arange(100, 100 + n, dtype=np.int32)  # distinct tokens: positions are recoverable
  packed = packing.PackedBlocks(stream, length)
  assert packed.num_blocks == -(-n // (length + 1))
  tokens, valid = packed.blocks(np.arange(packed.num_blocks))
  seen = tokens[valid]
  np.testing.assert_array_equal(np.sort(seen), stream)  # each token once, none invented
  np.testing.assert_array_equal(tokens.reshape(-1)[:n], stream)  # consecutive, in order
  assert not valid.reshape(-1)[n:].any()


def test_batches_shift_targets_and_weight_padding():
  stream = np.arange(1, 51, dtype=np.int32)
  packed = packing.PackedBlocks(stream, 9)  # 5 blocks of 10 tokens
  b = packing.block_batch(*packed.blocks(np.array([4, 0])))
  np.testing.assert_array_equal(b["inputs"][1], np.arange(1, 10))
  np.testing.assert_array_equal(b["targets"][1], np.arange(2, 11))
  np.testing.assert_array_equal(b["positions"][0], np.arange(9))
  assert b["weights"].all()
  short = packing.PackedBlocks(np.arange(1, 13, dtype=np.int32), 9)  # 2 blocks; the second has 2 tokens
  b = packing.block_batch(*short.blocks(np.array([1])))
  np.testing.assert_array_equal(b["inputs"][0, :2], [11, 12])
  np.testing.assert_array_equal(b["weights"][0], [1] + [0] * 8)  # only 11 -> 12 is a real target


def test_epoch_is_a_seeded_permutation_and_hosts_partition_it():
  stream = np.arange(10_000, dtype=np.int32)
  packed, rows = _epoch_blocks(stream, 31, batch=8, seed=3)
  firsts = np.concatenate([r["inputs"][:, 0] for r in rows])[:packed.num_blocks]
  starts = np.arange(packed.num_blocks) * 32
  np.testing.assert_array_equal(np.sort(firsts), starts)  # every block once per epoch
  assert not np.array_equal(firsts, starts)  # shuffled
  np.testing.assert_array_equal(firsts // 32, packing.epoch_order(packed.num_blocks, 3, 0))
  # Two processes: their halves of each global batch, concatenated, are the single-process batch.
  _, split = _epoch_blocks(stream, 31, batch=8, seed=3, process_count=2)
  for i, whole in enumerate(rows):
    got = np.concatenate([split[2 * i]["inputs"], split[2 * i + 1]["inputs"]])
    np.testing.assert_array_equal(got, whole["inputs"])
  # Another seed, another order; next epoch, another order.
  assert not np.array_equal(packing.epoch_order(packed.num_blocks, 4, 0), firsts // 32)
  assert not np.array_equal(packing.epoch_order(packed.num_blocks, 3, 1), firsts // 32)


def test_iterator_state_restores_exactly_across_epochs():
  packed = packing.PackedBlocks(np.arange(500, dtype=np.int32), 7)  # 63 blocks; batches of 10 cross epochs
  it = packing.BatchIterator(packed, 10, seed=0, process_index=0, process_count=1)
  for _ in range(8):
    next(it)
  state = it.state()
  assert state["epoch"] == 1
  expected = [next(it) for _ in range(10)]
  resumed = packing.BatchIterator(packed, 10, seed=0, process_index=0, process_count=1, state=dict(state))
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_bad_iterator_settings():
  packed = packing.PackedBlocks(np.arange(100, dtype=np.int32), 9)
  with pytest.raises(packing.PackingError, match="multiple of the process count"):
    packing.BatchIterator(packed, 3, 0, process_index=0, process_count=2)
  with pytest.raises(packing.PackingError, match="does not fit"):
    packing.BatchIterator(packed, 2, 0, process_index=0, process_count=1, state={"epoch": 0, "position": 99})
  with pytest.raises(packing.PackingError, match="at least 2"):
    packing.PackedBlocks(np.arange(1, dtype=np.int32), 9)
