"""Packed training data reaching the model: documents packed with document masks train exactly like each document
alone (per-document loss and the step's update), LongRoPE2's mixed window gives short documents the original
RoPE, and a mixture run through lrjax.train feeds the model what its config says (checked by hand)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import pretrain
from lrjax import model as model_lib
from lrjax import records, rope as rope_lib, stream, testing, train
from lrjax.train import feed as feed_lib

LENGTH = 32
# Packed lengths (BOS + tokens + EOS) in stream order: rows [20 12], [32], [7 9 16], then a padding row.
PACKED = [20, 12, 32, 7, 9, 16]
SEED = 3


def _documents():
  """Random documents with BOS 1 / EOS 2 whose stream order (the documented epoch permutation) has PACKED
  lengths, so every document lies whole in one row."""
  order = np.random.default_rng([SEED, 0, 0, 0]).permutation(len(PACKED))
  lengths = np.empty(len(PACKED), int)
  lengths[order] = PACKED
  rng = np.random.default_rng(0)
  return [rng.integers(3, 256, n - 2).astype(np.int32) for n in lengths]


def _alone_nll(cfg, params, bookended, size, rope):
  """Sum of next-token NLL of one document run alone at positions 0, 1, ...: materialised attention, full
  logits. `bookended` is the document padded at its end to a common length (one compilation for all): causal
  attention keeps the padding invisible to the document's `size` tokens, and its predictions are not counted."""
  inputs, targets = bookended[None, :-1], bookended[None, 1:]
  positions = jnp.arange(inputs.shape[1])[None]
  hidden = model_lib.forward(cfg.replace(attention="reference"), params, inputs, positions, rope)
  logits = jnp.einsum("btd,dv->btv", hidden, model_lib.head_weights(cfg, params))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  counted = jnp.arange(inputs.shape[1]) < size - 1
  return jnp.sum(jnp.where(counted, jax.nn.logsumexp(logits, axis=-1) - target_logit, 0.0))


@pytest.mark.parametrize("original_length", [None, 12])
def test_packed_documents_train_like_each_document_alone(original_length):
  """document_mask + reset_positions (+ LongRoPE2's mixed window: packed length <= 12 keeps the original RoPE):
  each document's loss in the packed batch, and the train step's update, equal those of the documents alone."""
  cfg = testing.tiny_config(attention="blockwise", block_q=8, block_k=8)
  # Large weights: attention far from uniform, so a leak across documents would move the losses visibly.
  params = jax.tree_util.tree_map_with_path(lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 15,
                                            model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  scaled = rope_lib.RopeScaling("yarn", factor=4.0, original_max_position_embeddings=16)
  ropes = {name: jax.tree.map(jnp.asarray, cfg.rope_arrays(s, seq_len=LENGTH))
           for name, s in (("scaled", scaled), ("original", rope_lib.RopeScaling()))}
  docs = _documents()
  (batch,) = stream.batches([stream.Component(stream.InMemoryDocuments(docs, bos_id=1, eos_id=2))], length=LENGTH,
                            global_batch=4, seed=SEED, reset_positions=True, document_mask=True,
                            original_length=original_length, num_epochs=1)
  bookended = [np.concatenate([[1], d, [2]]).astype(np.int32) for d in docs]
  where = {}  # document -> bool[rows, LENGTH], its tokens in the packed batch
  for r, s in {(r, s) for r in range(4) for s in batch["segment_ids"][r] if s}:
    tokens = batch["inputs"][r][batch["segment_ids"][r] == s]
    (d,) = [i for i, b in enumerate(bookended) if np.array_equal(b, tokens)]  # whole, and only once
    where[d] = np.zeros(batch["inputs"].shape, bool)
    where[d][r] = batch["segment_ids"][r] == s
  assert sorted(where) == list(range(len(docs)))

  keys = feed_lib.batch_keys({"document_mask": True, "original_length": original_length})
  packed = {k: jnp.asarray(batch[k]) for k in keys}
  sums = jax.jit(lambda p, b: train.loss_sums(cfg, p, b, ropes["scaled"], loss_chunk=16))
  alone = jax.jit(jax.value_and_grad(lambda p, t, n, r: _alone_nll(cfg, p, t, n, r)))
  total_nll, total_grad = 0.0, jax.tree.map(jnp.zeros_like, params)
  leaked = []
  for d, b in enumerate(bookended):
    short = original_length is not None and b.size <= original_length
    padded = np.pad(b, (0, LENGTH + 1 - b.size))
    nll, grad = alone(params, padded, b.size, ropes["original" if short else "scaled"])
    weights = packed["weights"] * where[d]
    got, count = sums(params, {**packed, "weights": weights})
    assert count == b.size - 1  # every transition inside the document, none across its boundaries
    np.testing.assert_allclose(got, nll, rtol=2e-5, err_msg=f"document {d} ({b.size} tokens)")
    no_mask = {k: v for k, v in packed.items() if k != "segment_ids"}
    leaked.append(abs(float(sums(params, {**no_mask, "weights": weights})[0]) / float(nll) - 1))
    total_nll, total_grad = total_nll + nll, jax.tree.map(jnp.add, total_grad, grad)
  assert sorted(leaked)[-3] > 1e-2  # without segment ids later documents see earlier ones: the test can tell

  # The train step (plain SGD, lr 1): loss = total NLL / transitions, update = -(sum of the gradients) / same.
  optimizer = optax.sgd(1.0)
  state = train.init_state(cfg, optimizer, jax.random.PRNGKey(1), params=params)
  new, metrics = jax.jit(train.make_train_step(cfg, optimizer, loss_chunk=16))(
      state, jax.tree.map(lambda x: x[None], packed), ropes["scaled"])
  n = sum(b.size - 1 for b in bookended)
  assert metrics["tokens"] == n
  np.testing.assert_allclose(metrics["loss"], total_nll / n, rtol=2e-5)
  for (path, old), updated, want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new.params),
                                        jax.tree.leaves(total_grad)):
    want = np.asarray(want) / n
    np.testing.assert_allclose(np.asarray(old) - np.asarray(updated), want, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want).max()), err_msg=jax.tree_util.keystr(path))


def _letters_jsonl(path, first: str, lengths) -> str:
  """Documents of one repeated letter each: document i is chr(ord(first) + i) * lengths[i]."""
  path.write_text("".join(json.dumps({"text": chr(ord(first) + i) * n}) + "\n" for i, n in enumerate(lengths)))
  return str(path)


def test_mixture_and_mixed_window_reach_the_model_as_configured(tmp_path, monkeypatch):
  """lrjax.train with data.mixture (a prepared directory and a source tokenized at start-up, weights, a length
  filter), document masks, reset positions and data.mixed_original_length: every batch the step receives is
  rebuilt by hand from the documents' lengths. Byte tokenizer: document i of A is bytes 'A'+i, of B 'a'+i,
  each followed by the separator 0."""
  lengths = [2 + i for i in range(20)]  # packed (with the separator): 3..22 tokens
  records.prepare(_letters_jsonl(tmp_path / "a.jsonl", "A", lengths), tmp_path / "a", progress=False)
  c = pretrain.get_config("tiny")  # batch 8 over the 8 simulated devices: 8 row shards of 1 row, 32 tokens
  c.data.source = ""
  c.data.mixture = [dict(path=str(tmp_path / "a"), weight=0.3, min_tokens=0, max_tokens=0),
                    dict(path=_letters_jsonl(tmp_path / "b.jsonl", "a", lengths), weight=0.7, min_tokens=6,
                         max_tokens=16)]
  c.data.update(document_mask=True, reset_positions=True, mixed_original_length=10)
  c.stages[0].update(steps=3, rope="linear", rope_factor=2.0)
  fed = []
  real_next = feed_lib.Feed.__next__
  monkeypatch.setattr(feed_lib.Feed, "__next__", lambda self: fed.append(real_next(self)) or fed[-1])
  out = train.train(c, str(tmp_path / "run"), report=lambda _: None, progress=False)
  assert out["step"] == 3 and np.isfinite(out["loss"])
  assert len(fed) == 3 and all(set(b) == {"inputs", "targets", "positions", "weights", "segment_ids",
                                          "original_rope"} for b in fed)
  host = [{k: np.asarray(v)[0] for k, v in b.items()} for b in fed]  # [8 rows, 32] each

  streams = {}  # (row shard, component) -> its rows in order
  for b in host:
    for row in range(8):
      letters = b["inputs"][row][b["inputs"][row] > 0]
      streams.setdefault((row, "B" if letters.min() >= ord("a") else "A"), []).append((b, row))
  assert {comp for _, comp in streams} == {"A", "B"}
  for (_, comp), rows in streams.items():
    tokens = np.concatenate([b["inputs"][row] for b, row in rows])
    # By hand: documents end at each separator; a token's offset in its document, its document's packed length.
    ends = np.flatnonzero(tokens == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    offset, packed = np.zeros(tokens.size, int), np.zeros(tokens.size, int)
    for a, e in zip(starts, ends):
      letter = tokens[a] - (ord("A") if comp == "A" else ord("a"))
      offset[a:e + 1], packed[a:e + 1] = np.arange(e + 1 - a), lengths[letter] + 1
      assert (tokens[a:e] == tokens[a]).all() and e - a == lengths[letter]  # a whole document, in order
    tail = slice(ends[-1] + 1, None)  # the document the last row cuts
    offset[tail], packed[tail] = np.arange(tokens.size - ends[-1] - 1), 10 ** 6
    if comp == "B":
      assert ((packed[:ends[-1] + 1] >= 6) & (packed[:ends[-1] + 1] <= 16)).all()  # the length filter
    for k, (b, row) in enumerate(rows):
      cols = slice(32 * k, 32 * (k + 1))
      np.testing.assert_array_equal(b["positions"][row], offset[cols])
      known = packed[cols] < 10 ** 6
      np.testing.assert_array_equal(b["original_rope"][row][known], packed[cols][known] <= 10)
      new_doc = np.concatenate([[1], offset[cols][1:] == 0])
      np.testing.assert_array_equal(b["segment_ids"][row], np.cumsum(new_doc))
      np.testing.assert_array_equal(b["weights"][row], tokens[cols] != 0)  # separator -> next document: masked
      np.testing.assert_array_equal(b["targets"][row][:-1], tokens[cols][1:])


def test_data_prepared_with_another_tokenizer_is_one_line(tmp_path):
  words = "the quick brown fox".split()
  spec = testing.word_tokenizer(tmp_path / "tokenizer.json", words)
  (tmp_path / "w.jsonl").write_text("".join(json.dumps({"text": " ".join(words[:k])}) + "\n" for k in range(1, 5)))
  records.prepare(str(tmp_path / "w.jsonl"), tmp_path / "w", tokenizer=spec, progress=False)
  c = pretrain.get_config("tiny")
  c.data.source = str(tmp_path / "w")  # the model's tokenizer is bytes
  with pytest.raises(ValueError, match="tokenizer mismatch between prepared data and model") as e:
    train.train(c, str(tmp_path / "run"), report=lambda _: None, progress=False)
  assert "\n" not in str(e.value)
