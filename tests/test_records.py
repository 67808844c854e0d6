"""Prepared token records: contents against the source, worker/in-process and resumed/fresh byte equality,
tokenizer identity, and one-line errors for missing, corrupt and mismatched data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lrjax import data, records, testing, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the quick brown fox jumps over a lazy dog and then sleeps".split()


def _files(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for top, _, names in os.walk(root):
    for name in names:
      path = os.path.join(top, name)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


def _jsonl(path, texts):
  path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
  return str(path)


def _word_tokenizer(tmp_path):
  """A Hugging Face WordLevel tokenizer.json over WORDS with <s>/</s> added (BOS 1, EOS 2)."""
  pytest.importorskip("tokenizers")
  return testing.word_tokenizer(tmp_path / "tokenizer.json", WORDS)


def test_prepare_matches_the_source_and_records_the_tokenizer(tmp_path):
  out = tmp_path / "valid"
  manifest = records.prepare("builtin:valid", out, shard_documents=5, progress=False)
  texts = [d.text for d in data.documents("builtin:valid")]
  assert [s["documents"] for s in manifest["shards"]] == [5, 5, 5, 1]
  assert manifest["documents"] == 16 and manifest["tokens"] == sum(len(t.encode()) for t in texts)
  assert manifest["tokenizer"]["vocab_size"] == 256 and manifest["tokenizer"]["bos_id"] is None
  r = records.Records(out, tokenizer="byte")
  assert r.lengths.tolist() == [len(t.encode()) for t in texts]
  for i in (0, 7, 15):
    assert r.read(i).tolist() == list(texts[i].encode())
  assert r.read(3, 100, 164).tolist() == list(texts[3].encode()[100:164])  # a range read
  assert os.path.getsize(out / "shards" / "00000.tokens") == 2 * sum(len(t.encode()) for t in texts[:5])  # u16
  r.verify()


def test_workers_and_bos_eos_tokenizer(tmp_path):
  """Two spawned workers loading an HF tokenizer from its spec write exactly what one process writes."""
  spec = _word_tokenizer(tmp_path)
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(40)] + ["zebra fox"]
  source = _jsonl(tmp_path / "words.jsonl", texts)
  records.prepare(source, tmp_path / "one", tokenizer=spec, shard_documents=7, progress=False)
  records.prepare(source, tmp_path / "two", tokenizer=spec, shard_documents=7, num_workers=2, progress=False)
  assert _files(tmp_path / "one") == _files(tmp_path / "two")
  r = records.Records(tmp_path / "two", tokenizer=spec)
  assert (r.bos_id, r.eos_id) == (1, 2)
  ids = {w: i + 3 for i, w in enumerate(WORDS)}
  for i, t in enumerate(texts):
    assert r.read(i).tolist() == [ids.get(w, 0) for w in t.split()]  # no bookends stored; unknown -> <unk>


def test_interrupted_prepare_resumes_to_identical_output(tmp_path):
  fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
  records.prepare("builtin:train", fresh, shard_documents=16, progress=False)
  # A real interruption: kill -9 a run as soon as its first shard is complete.
  code = ("import sys; sys.path.insert(0, sys.argv[1]); from lrjax import records; "
          "records.prepare('builtin:train', sys.argv[2], shard_documents=16, progress=False)")
  proc = subprocess.Popen([sys.executable, "-c", code, REPO, str(resumed)])
  deadline = time.time() + 60
  while not (resumed / "shards" / "00000.index.npy").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (resumed / "manifest.json").exists(), "the run finished before it could be interrupted"
  # And the half-written states a crash can leave: a shard whose tokens file is short, a stray temporary.
  shards = resumed / "shards"
  done = sorted(p for p in os.listdir(shards) if p.endswith(".index.npy"))
  (shards / done[-1].replace(".index.npy", ".tokens")).write_bytes(b"\0" * 10)
  (shards / ".00030.tokens.tmp").write_bytes(b"partial")
  records.prepare("builtin:train", resumed, shard_documents=16, progress=False)
  got = {k: v for k, v in _files(resumed).items() if not k.endswith(".tmp")}
  assert got == _files(fresh)


class _ShiftedBytes:
  """Same size and special ids as the byte tokenizer, another id -> text mapping."""
  vocab_size, bos_id, eos_id, name = 256, None, None, "shifted"

  def encode(self, text):
    return (np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 1) % 256

  def decode(self, ids):
    return bytes(((np.asarray(ids) - 1) % 256).astype(np.uint8).tolist()).decode("utf-8", "replace")


def _one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(records.RecordsError, match=match) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path):
  out = tmp_path / "valid"
  records.prepare("builtin:valid", out, shard_documents=5, progress=False)
  _one_line_error("tokenizer mismatch between prepared data and model.*vocab_hash", records.Records, out,
                  tokenizer=_ShiftedBytes())
  _one_line_error("not a prepared data directory", records.Records, tmp_path)
  _one_line_error("other settings \\(source differ\\)", records.prepare, "builtin:test", out, shard_documents=5,
                  progress=False)
  _one_line_error("empty corpus", records.prepare, _jsonl(tmp_path / "empty.jsonl", ["", ""]), tmp_path / "e",
                  progress=False)
  shard1 = out / "shards" / "00001.tokens"
  payload = bytearray(shard1.read_bytes())
  payload[101] ^= 0x01  # one bit of document 5
  shard1.write_bytes(bytes(payload))
  r = records.Records(out)
  assert r.read(4).size  # shard 0 is intact
  _one_line_error(r"00001.tokens: corrupt record: document 5 fails its CRC32 check", r.read, 5)
  shard1.write_bytes(bytes(payload[:-2]))
  _one_line_error(r"00001.tokens: corrupt shard", records.Records(out).read, 6)
  os.remove(out / "shards" / "00002.tokens")
  _one_line_error(r"00002.tokens: missing shard", records.Records(out).read, 11)


def test_tokenizer_identity_tells_vocabularies_apart(tmp_path):
  byte = records.tokenizer_identity(tokenizers.ByteTokenizer(), "byte")
  assert byte == records.tokenizer_identity(tokenizers.load_tokenizer("byte"), "byte")
  assert byte["vocab_hash"] != records.tokenizer_identity(_ShiftedBytes(), "shifted")["vocab_hash"]
  word = records.tokenizer_identity(tokenizers.load_tokenizer(_word_tokenizer(tmp_path)), "w")
  assert (word["vocab_size"], word["bos_id"], word["eos_id"]) == (len(WORDS) + 3, 1, 2)
