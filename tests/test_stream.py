"""The streaming input: packing by hand, every token once per epoch over shards and processes, segments that
rebuild documents, exact resume with and without workers, mixture weights and length filters, remote paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lrjax import data, records, stream, testing, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perm(n, seed, component=0, epoch=0):
  """The documented epoch order."""
  return np.random.default_rng([seed, 0, component, epoch]).permutation(n)


def _stitch(batches):
  """Documents rebuilt from packed rows (reset_positions): each segment's inputs, in order; a segment whose
  first position is not 0 continues the previous row's last document. Returns [(tokens, positions)]."""
  docs = []
  for b in batches:
    for row in range(b["inputs"].shape[0]):
      seg, pos, ids = b["segment_ids"][row], b["positions"][row], b["inputs"][row]
      for s in range(1, seg.max() + 1):
        where = seg == s
        if pos[where][0] > 0:
          docs[-1] = (docs[-1][0] + ids[where].tolist(), docs[-1][1] + pos[where].tolist())
        else:
          docs.append((ids[where].tolist(), pos[where].tolist()))
      assert not seg[seg == 0].size or (seg[np.argmax(seg == 0):] == 0).all()  # padding only at the end
  return docs


def _bookended(doc, bos=None, eos=None, separator=(0,)):
  return ([] if bos is None else [bos]) + list(doc) + ([eos] if eos is not None else list(separator))


def test_hand_packed_example():
  docs = stream.InMemoryDocuments([[11, 12, 13], [21, 22], [31, 32, 33, 34, 35]], bos_id=1, eos_id=2)
  assert _perm(3, 0).tolist() == [2, 0, 1]  # stream: 1 31 32 33 34 35 2 | 1 11 12 13 2 | 1 21 22 2
  out = list(stream.batches([stream.Component(docs)], length=4, global_batch=2, seed=0, reset_positions=True,
                            document_mask=True, original_length=5, num_epochs=1))
  assert len(out) == 2
  b = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
  np.testing.assert_array_equal(b["inputs"], [[1, 31, 32, 33], [34, 35, 2, 1], [11, 12, 13, 2], [1, 21, 22, 2]])
  np.testing.assert_array_equal(b["targets"], [[31, 32, 33, 34], [35, 2, 1, 11], [12, 13, 2, 1], [21, 22, 2, 0]])
  # Document 2 (7 packed tokens) is split over rows 0 and 1; its positions continue; row 2 continues doc 0.
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [4, 5, 6, 0], [1, 2, 3, 4], [0, 1, 2, 3]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 1, 1]])
  # 2 -> 1 and 2 -> 1 cross documents; the stream's last token has no target.
  np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(b["original_rope"], [[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
  assert {k: (v.shape, v.dtype.name) for k, v in out[0].items()} == {
      "inputs": ((2, 4), "int32"), "targets": ((2, 4), "int32"), "positions": ((2, 4), "int32"),
      "segment_ids": ((2, 4), "int32"), "weights": ((2, 4), "float32"), "original_rope": ((2, 4), "bool")}
  # Defaults: positions 0..length-1 and the cross-document targets weighted like any other.
  plain = next(stream.batches([stream.Component(docs)], length=4, global_batch=2, seed=0))
  np.testing.assert_array_equal(plain["positions"], [[0, 1, 2, 3]] * 2)
  np.testing.assert_array_equal(plain["weights"], np.ones((2, 4)))
  assert "original_rope" not in plain


def test_separator_and_padding():
  docs = stream.InMemoryDocuments([[5, 6], [7]])  # no BOS/EOS: NUL separator after each document
  assert _perm(2, 3).tolist() == [1, 0]  # stream: 7 0 | 5 6 0 (5 tokens: 2 rows of 3, the second short)
  b = next(stream.batches([stream.Component(docs)], length=3, global_batch=4, seed=3, num_epochs=1,
                          reset_positions=True))
  np.testing.assert_array_equal(b["inputs"], [[7, 0, 5], [6, 0, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(b["targets"], [[0, 5, 6], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(b["weights"], [[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 2], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 0], [1, 2, 0], [0, 0, 0], [0, 0, 0]])
  sep = next(stream.batches([stream.Component(docs)], length=4, global_batch=1, seed=3, separator=(9, 9)))
  np.testing.assert_array_equal(sep["inputs"], [[7, 9, 9, 5]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """30 distinct documents of 1..300 bytes, prepared as records (byte tokenizer, 4 shards)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(1)
  texts = [f"doc{i}:" + "".join(rng.choice(list("abcdefgh \n"), rng.integers(0, 295))) for i in range(30)]
  src = root / "docs.jsonl"
  src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  records.prepare(str(src), root / "rec", shard_documents=8, progress=False)
  return str(root / "rec"), [list(t.encode()) for t in texts]


@pytest.mark.parametrize("length,global_batch", [(64, 4), (7, 2)])
def test_every_token_once_per_epoch_across_shards(corpus, length, global_batch):
  path, texts = corpus
  got = []
  for shard in range(2):
    it = stream.batches([stream.Component(records.Records(path))], length=length, global_batch=global_batch,
                        seed=5, shard_index=shard, shard_count=2, reset_positions=True, num_epochs=1)
    docs = _stitch(it)
    assert all(p == list(range(len(t))) for t, p in docs)  # each rebuilt document at positions 0..n-1
    expected = [_bookended(texts[i]) for i in _perm(30, 5)[shard::2]]
    assert [t for t, _ in docs] == expected  # this shard's share of the epoch, in order
    got += [tuple(t) for t, _ in docs]
  assert sorted(got) == sorted(tuple(_bookended(t)) for t in texts)  # every document exactly once


def test_epochs_continue_and_reshuffle(corpus):
  path, texts = corpus
  total = sum(len(t) + 1 for t in texts)
  it = stream.batches([stream.Component(records.Records(path))], length=50, global_batch=3, seed=2)
  flat = np.concatenate([next(it)["inputs"].reshape(-1) for _ in range(-(-2 * total // 150))])  # rows: stride 50
  expected = [sum((_bookended(texts[i]) for i in _perm(30, 2, epoch=e)), []) for e in (0, 1)]
  assert flat[:total].tolist() == expected[0] and flat[total:2 * total].tolist() == expected[1]
  assert expected[0] != expected[1]


def test_two_processes_each_read_their_shard(corpus, tmp_path):
  path, texts = corpus
  code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from lrjax import records, stream; "
          "it = stream.batches([stream.Component(records.Records(sys.argv[2]))], length=32, global_batch=4, "
          "seed=9, shard_index=int(sys.argv[3]), shard_count=2, reset_positions=True, num_epochs=1); "
          "bs = list(it); np.savez(sys.argv[4], **{k: np.concatenate([b[k] for b in bs]) for k in bs[0]})")
  procs = [subprocess.Popen([sys.executable, "-c", code, REPO, path, str(s), str(tmp_path / f"{s}.npz")])
           for s in range(2)]
  assert [p.wait(timeout=120) for p in procs] == [0, 0]
  got = []
  for s in range(2):
    with np.load(tmp_path / f"{s}.npz") as f:
      got += [tuple(t) for t, _ in _stitch([dict(f)])]
  assert sorted(got) == sorted(tuple(_bookended(t)) for t in texts)


def _mixture():
  """Three in-memory components whose token c * 1000 + i + 1 names component c and document i; document i is
  4 + 7 * i tokens long (packed: + 1 separator)."""
  comps = []
  for c, (weight, lo, hi) in enumerate([(0.2, 0, None), (0.3, 30, 120), (0.5, 0, 60)]):
    docs = [[c * 1000 + i + 1] * (4 + 7 * i) for i in range(20)]
    comps.append(stream.Component(stream.InMemoryDocuments(docs, name=f"c{c}"), weight, lo, hi))
  return comps


def test_mixture_weights_filters_and_original_rope():
  comps = _mixture()
  it = stream.batches(comps, length=40, global_batch=16, seed=0, shard_index=1, shard_count=2,
                      reset_positions=True, original_length=25)
  rows = {c: 0 for c in range(3)}
  n_batches = 150
  for _ in range(n_batches):
    b = next(it)
    tok = b["inputs"]
    real = tok != 0  # 0 is the separator
    comp, doc = (tok - 1) // 1000, (tok - 1) % 1000
    for r in range(tok.shape[0]):
      cs = set(comp[r][real[r]].tolist())
      assert len(cs) == 1  # a row comes from one component
      rows[cs.pop()] += 1
    packed = 4 + 7 * doc + 1
    lo = np.array([c.min_tokens for c in comps])[comp]
    hi = np.array([c.max_tokens or 10 ** 9 for c in comps])[comp]
    assert ((packed >= lo) & (packed <= hi))[real].all()  # length filters hold
    np.testing.assert_array_equal(b["original_rope"][real], (packed <= 25)[real])
  n = n_batches * 8
  for c, comp in enumerate(comps):
    p = comp.weight
    assert abs(rows[c] - n * p) <= 4 * np.sqrt(n * p * (1 - p)), (rows, c)  # binomial, 4 sigma


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(workers):
  comps = _mixture()
  kw = dict(length=24, global_batch=4, seed=1, shard_index=0, shard_count=2, reset_positions=True,
            document_mask=True)
  with stream.batches(comps, **kw) as it:
    reference = [next(it) for _ in range(300)]  # crosses mixture chunks (256 batches) and epochs
  with stream.batches(comps, num_workers=workers, **kw) as it:
    head = [next(it) for _ in range(290)]
    state = json.loads(json.dumps(it.state()))
  with stream.batches(comps, num_workers=workers, state=state, **kw) as it:
    tail = [next(it) for _ in range(10)]
  for got, want in zip(head + tail, reference):
    assert got.keys() == want.keys()
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])


def test_in_memory_sources_and_open_component(corpus, tmp_path):
  path, texts = corpus
  tok = tokenizers.ByteTokenizer()
  prepared = stream.open_component({"path": path, "weight": 2.0}, tok)
  assert isinstance(prepared.documents, records.Records) and prepared.weight == 2.0
  live = stream.open_component("builtin:valid", tok)
  assert live.documents.read(3).tolist() == list(list(data.documents("builtin:valid"))[3].text.encode())
  kw = dict(length=128, global_batch=2, seed=4, num_epochs=1)
  from_records = list(stream.batches([stream.Component(records.Records(path))], **kw))
  in_memory = list(stream.batches([stream.Component(stream.InMemoryDocuments(texts))], **kw))
  assert len(from_records) == len(in_memory)
  for a, b in zip(from_records, in_memory):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


@pytest.fixture
def gcs():
  """gs:// served from memory (lrjax.testing.fake_gcs): epath reaches it through fsspec, as a real bucket."""
  with testing.fake_gcs() as fs:
    yield fs


def test_remote_prepare_and_stream(gcs):
  from etils import epath
  texts = ["first remote document", "second one", "x" * 100]
  src = epath.Path("gs://bucket/src")
  src.mkdir(parents=True)
  (src / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  for i, t in enumerate(texts):
    (src / "folder" / ("sub" if i else "")).mkdir(parents=True, exist_ok=True)
    (src / "folder" / ("sub" if i else "") / f"{i}.txt").write_text(t)
  assert [d.text for d in data.documents("gs://bucket/src/folder?pattern=**/*.txt")] == texts
  assert [d.text for d in data.documents("gs://bucket/src/folder")] == texts[:1]  # * stays in the folder
  records.prepare("gs://bucket/src/docs.jsonl", "gs://bucket/rec", shard_documents=2, progress=False)
  assert "bucket/rec/manifest.json" in gcs.store
  assert not os.path.exists("gs:") and not os.path.exists("bucket")
  it = stream.batches([stream.Component(records.Records("gs://bucket/rec", tokenizer="byte"))], length=16,
                      global_batch=2, seed=0, reset_positions=True, num_epochs=1)
  assert sorted(tuple(t) for t, _ in _stitch(it)) == sorted(tuple(_bookended(t.encode())) for t in texts)


def _stream_error(match, *args, **kwargs):
  with pytest.raises(stream.StreamError, match=match) as e:
    stream.batches(*args, **kwargs)
  assert "\n" not in str(e.value)


def test_bad_settings_are_one_line_errors():
  comps = _mixture()
  kw = dict(length=8, global_batch=4, seed=0)
  good = stream.batches(comps, **kw)
  next(good)
  _stream_error("not from this pipeline", comps, state=good.state(), **{**kw, "seed": 1})
  _stream_error("divisible by the shard count", comps, length=8, global_batch=3, seed=0, shard_count=2)
  _stream_error("needs reset_positions", comps, original_length=4, **kw)
  _stream_error("one component", comps, num_epochs=1, **kw)
  few = [stream.Component(stream.InMemoryDocuments([[1], [2]], name="two docs"))]
  _stream_error("two docs: 2 documents .* fewer than the 4 shards", few, shard_count=4, **kw)
  _stream_error(r"c0: 0 documents with packed length in \[500, None\]",
                [stream.Component(comps[0].documents, min_tokens=500)], **kw)
  with pytest.raises(stream.StreamError, match="expected keys"):
    stream.open_component({"path": "builtin:valid", "wieght": 1.0})
