"""Document sources and tokenized documents: every source kind, order, filtering and error messages."""

import gzip
import json

import numpy as np
import pytest

from lrjax import data, tokenizers


class _ToyTokenizer:
  """Whitespace words -> their lengths; BOS 0 (a tokenizer with BOS, independent of lrjax.tokenizers)."""
  bos_id, eos_id, vocab_size = 0, None, 100

  def encode(self, text):
    return [len(w) for w in text.split()]


def _write_jsonl(path, records, compress=False):
  text = "".join(json.dumps(r) + "\n" for r in records)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")


def test_text_file_and_folder(tmp_path):
  f = tmp_path / "one.txt"
  f.write_text("héllo wörld", encoding="utf-8")
  assert list(data.documents(str(f))) == [data.Document(str(f), "héllo wörld")]
  folder = tmp_path / "docs"
  (folder / "sub").mkdir(parents=True)
  for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("c.md", "sea"), ("sub/d.txt", "dee")]:
    (folder / name).write_text(text)
  assert [d.id for d in data.documents(str(folder))] == ["a.txt", "b.txt"]
  assert [(d.id, d.text) for d in data.documents(f"{folder}?pattern=**/*.txt")] == [
      ("a.txt", "ay"), ("b.txt", "bee"), ("sub/d.txt", "dee")]
  assert [d.text for d in data.documents(f"{folder}?pattern=*.md")] == ["sea"]
  with pytest.raises(data.DataError, match=r"no files match '\*.rst'"):
    list(data.documents(f"{folder}?pattern=*.rst"))


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl(tmp_path, compress):
  path = tmp_path / ("d.jsonl.gz" if compress else "d.jsonl")
  _write_jsonl(path, [{"id": "x", "text": "one", "body": "uno"}, {"text": "two", "body": "dos"}], compress)
  docs = list(data.documents(str(path)))
  assert docs == [data.Document("x", "one"), data.Document(f"{path}:2", "two")]
  assert [d.text for d in data.documents(f"{path}?field=body")] == ["uno", "dos"]


def test_jsonl_errors_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
  with pytest.raises(data.DataError, match=r"bad.jsonl:3: malformed JSON line"):
    list(data.documents(str(path)))
  path.write_text('{"text": "fine"}\n{"content": "x"}\n')
  with pytest.raises(data.DataError, match=r"bad.jsonl:2: no 'text' field \(found: content\)"):
    list(data.documents(str(path)))
  path.write_text('{"text": 3}\n')
  with pytest.raises(data.DataError, match=r"bad.jsonl:1: field 'text' is int"):
    list(data.documents(str(path)))


def test_builtin_corpus_matches_its_files():
  docs = list(data.documents("builtin:test"))
  with gzip.open(f"{data.BUILTIN_DIR}/test.jsonl.gz", "rt", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in records]
  assert len(docs) == 16


def test_bad_sources(tmp_path):
  with pytest.raises(data.DataError, match="no such file or directory"):
    data.parse_source(str(tmp_path / "nope.jsonl"))
  with pytest.raises(data.DataError, match="unknown built-in split 'dev'"):
    data.parse_source("builtin:dev")
  with pytest.raises(data.DataError, match="bad option 'colour=red'"):
    data.parse_source("builtin:test?colour=red")
  with pytest.raises(data.DataError, match="pattern do not apply to a jsonl source"):
    data.parse_source(f"{data.BUILTIN_DIR}/test.jsonl.gz?pattern=*.txt")
  with pytest.raises(data.DataError, match="empty path"):
    data.parse_source("")
  with pytest.raises(data.DataError, match="missing TFDS dataset name"):
    data.parse_source("tfds:")
  binary = tmp_path / "blob.txt"
  binary.write_bytes(b"\xff\xfe\x00bad")
  with pytest.raises(data.DataError, match="not UTF-8 text"):
    list(data.documents(str(binary)))


def test_tokenized_documents_filtering_order_and_bos(tmp_path):
  path = tmp_path / "d.jsonl"
  texts = ["a bb", "a bb ccc dddd", "x", "a bb ccc", "aaaaa bb ccc dddd e"]
  _write_jsonl(path, [{"text": t} for t in texts])
  tok = _ToyTokenizer()
  docs = data.tokenized_documents(str(path), tok)
  assert [d.tolist() for d in docs] == [[0] + [len(w) for w in t.split()] for t in texts]
  assert all(d.dtype == np.int32 for d in docs)
  long = data.tokenized_documents(str(path), tok, min_tokens=4)  # BOS counts
  assert [d.tolist() for d in long] == [[0, 1, 2, 3, 4], [0, 1, 2, 3], [0, 5, 2, 3, 4, 1]]
  first_two = data.tokenized_documents(str(path), tok, min_tokens=4, max_documents=2)
  assert [d.tolist() for d in first_two] == [[0, 1, 2, 3, 4], [0, 1, 2, 3]]
  no_bos = data.tokenized_documents(str(path), tok, add_bos=False, max_documents=1)
  assert no_bos[0].tolist() == [1, 2]
  with pytest.raises(data.DataError, match=r"0 of 5 documents have >= 16384 tokens \(longest: 6\)"):
    data.tokenized_documents(str(path), tok, min_tokens=16384)
  with pytest.raises(data.DataError, match="has no BOS id"):
    data.tokenized_documents(str(path), tokenizers.ByteTokenizer(), add_bos=True)


def test_tokenized_builtin_bytes():
  tok = tokenizers.ByteTokenizer()
  docs = data.tokenized_documents("builtin:valid", tok, max_documents=3)
  texts = [d.text for d in data.documents("builtin:valid")][:3]
  assert [d.tolist() for d in docs] == [list(t.encode("utf-8")) for t in texts]  # no BOS for bytes


def test_tfds_without_tensorflow():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    docs = list(data.documents("tfds:pg19?split=test&field=book_text"))
    assert [d.id for d in docs] == [f"pg19/test/{i}" for i in range(4)]
    assert all(isinstance(d.text, str) and d.text for d in docs)
    again = list(data.documents("tfds:pg19?split=test&field=book_text"))
    assert docs == again  # deterministic
    with pytest.raises(data.DataError, match=r"no 'text' feature \(features: .*book_text"):
      list(data.documents("tfds:pg19?split=test"))
    toks = data.tokenized_documents("tfds:pg19?field=book_text", tokenizers.ByteTokenizer(), max_documents=2)
    assert [t.tolist() for t in toks] == [list(d.text.encode()) for d in docs[:2]]


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.DataError, match=r"tfds:pg19 split 'test': cannot read it without downloading"):
    list(data.documents(f"tfds:pg19?data_dir={tmp_path}"))


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  path = tmp_path / "d.parquet"
  pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one", "twö", ""], "body": ["uno", "dos", "tres"],
                           "n": [1, 2, 3]}), path, row_group_size=2)  # two row groups
  assert list(data.documents(str(path))) == [data.Document("a", "one"), data.Document("b", "twö"),
                                             data.Document("c", "")]
  assert [d.text for d in data.documents(f"{path}?field=body")] == ["uno", "dos", "tres"]
  unnamed = tmp_path / "plain.parquet"
  pq.write_table(pa.table({"text": ["x", "y"]}), unnamed)
  assert [d.id for d in data.documents(str(unnamed))] == [f"{unnamed}:0", f"{unnamed}:1"]
  toks = data.tokenized_documents(str(path), tokenizers.ByteTokenizer())
  assert [t.tolist() for t in toks] == [list(b"one"), list("twö".encode()), []]
  with pytest.raises(data.DataError, match=r"no 'body2' column \(columns: id, text, body, n\)"):
    list(data.documents(f"{path}?field=body2"))
  with pytest.raises(data.DataError, match="column 'n' is int64, not a string"):
    list(data.documents(f"{path}?field=n"))
  with pytest.raises(data.DataError, match="pattern do not apply to a parquet source"):
    data.parse_source(f"{path}?pattern=*.txt")
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"not parquet at all")
  with pytest.raises(data.DataError, match="not a parquet file"):
    list(data.documents(str(bad)))


def test_comma_joined_sources_are_their_documents_in_turn(tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("first")
  b.write_text("second")
  docs = list(data.documents(f"{a},{b},builtin:valid"))
  assert [d.text for d in docs[:2]] == ["first", "second"]
  assert [d.id for d in docs[2:]] == [d.id for d in data.documents("builtin:valid")]
  with pytest.raises(data.DataError, match="no such file"):
    list(data.documents(f"{a},{tmp_path / 'missing.txt'}"))
