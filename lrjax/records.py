"""Prepared token records: tokenize a corpus once, in parallel, into shards read later by random access.

A prepared directory (any etils.epath location: local, gs://, ...):

  prepare.json            the settings that determine the output (source, tokenizer identity, shard size,
                          max_documents, dtype); a rerun into the same directory must match them
  shards/NNNNN.tokens     the shard's documents' token ids back to back, no bookends (little-endian uint16
                          when the vocabulary fits, else int32)
  shards/NNNNN.index.npy  int64[2, n]: each document's token count and the CRC32 of its stored bytes
  index.npy               int64[2, N]: every shard's index, concatenated (written once all shards exist)
  manifest.json           written last: format, source, tokenizer identity, dtype, documents, tokens, shards

Shard i holds documents [i * shard_documents, (i + 1) * shard_documents) of the source's order, so its bytes
depend only on the source and the settings. Every file is written to a temporary name and renamed, so a
shard is complete exactly when its index exists and its tokens file has the size the index implies; an
interrupted `prepare` rerun with the same arguments redoes only incomplete shards and its output is
byte-identical to an uninterrupted run.

Why not ArrayRecord: array_record 0.8.6's reader takes only a local path string (no file object, no
fsspec); here gs://, memory:// and file:// paths each "open" as 0 records without an error (gs:// after a
~40 s stall), so it cannot serve data through epath. These shards are two plain files read with range
reads through `epath.Path.open`, which any epath backend provides.

The tokenizer identity (spec, vocab size, BOS/EOS ids and a SHA-256 of the id -> text mapping) is recorded,
and `Records(path, tokenizer=...)` refuses data prepared with a different tokenizer than the model's.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import zlib
from typing import Iterator

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from lrjax import data as data_lib
from lrjax import schema
from lrjax import tokenizers as tokenizers_lib

FORMAT = "lrjax.records/1"
_PROBE = "The quick brown fox — 敏捷的狐狸 — jumps over 13 lazy dogs.\n\tdef f(x): return x ** 2\n"


class RecordsError(ValueError):
  """A prepared directory that cannot be written or read; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Tokenizer identity.


def tokenizer_identity(tokenizer: tokenizers_lib.Tokenizer, spec: str) -> dict:
  """{spec, vocab_size, bos_id, eos_id, vocab_hash}: vocab_hash is a SHA-256 of every id's decoded text and
  of the ids of a fixed multilingual probe, so two tokenizers with equal hashes map ids to text alike."""
  h = hashlib.sha256()
  for i in range(tokenizer.vocab_size):
    h.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass") + b"\0")
  h.update(np.asarray(tokenizer.encode(_PROBE), np.int64).tobytes())
  return {"spec": spec, "vocab_size": int(tokenizer.vocab_size), "bos_id": tokenizer.bos_id,
          "eos_id": tokenizer.eos_id, "vocab_hash": h.hexdigest()}


def check_tokenizer(recorded: dict, tokenizer: tokenizers_lib.Tokenizer | str, where: str) -> None:
  """Raises RecordsError when `tokenizer` (an object or a load_tokenizer spec) is not the one recorded."""
  spec = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name", repr(tokenizer))
  tok = tokenizers_lib.load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
  actual = tokenizer_identity(tok, spec)
  diff = [f"{k} {recorded.get(k)!r} vs {actual[k]!r}" for k in ("vocab_size", "bos_id", "eos_id", "vocab_hash")
          if recorded.get(k) != actual[k]]
  if diff:
    raise RecordsError(f"tokenizer mismatch between prepared data and model: {where} was prepared with "
                       f"{recorded.get('spec')!r}, the model's tokenizer is {spec!r} ({'; '.join(diff)})")


# ----------------------------------------------------------------------------------------------------------
# Writing.


def _atomic_write(path: epath.Path, payload: bytes) -> None:
  """Write to a temporary name, then rename: readers see the whole file or none."""
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(payload)
  tmp.replace(path)


def _npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)  # .npy is byte-deterministic (.npz embeds timestamps)
  return buf.getvalue()


def _load_npy(path: epath.Path) -> np.ndarray:
  try:
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
  except FileNotFoundError:
    raise RecordsError(f"{path}: missing") from None
  except ValueError as e:
    raise RecordsError(f"{path}: corrupt index ({str(e).splitlines()[0]})") from None


def _shard_paths(root: epath.Path, i: int) -> tuple[epath.Path, epath.Path]:
  return root / "shards" / f"{i:05d}.tokens", root / "shards" / f"{i:05d}.index.npy"


_WORKER: dict = {}


def _init_worker(spec: str) -> None:
  """Pool initializer: each worker loads the tokenizer once."""
  _WORKER["tokenizer"] = tokenizers_lib.load_tokenizer(spec)


def _encode_shard(texts: list[str], dtype: str) -> tuple[np.ndarray, bytes]:
  """(int64[2, n] token counts and CRC32s, the shard's token bytes) of one shard's documents."""
  tok = _WORKER["tokenizer"]
  arrays = [np.asarray(tok.encode(t)).astype(dtype) for t in texts]
  chunks = [a.tobytes() for a in arrays]
  index = np.array([[a.size for a in arrays], [zlib.crc32(c) for c in chunks]], np.int64).reshape(2, -1)
  return index, b"".join(chunks)


def _shard_done(root: epath.Path, i: int, itemsize: int) -> bool:
  tokens, index = _shard_paths(root, i)
  if not index.exists() or not tokens.exists():
    return False
  try:
    return tokens.stat().length == int(_load_npy(index)[0].sum()) * itemsize
  except RecordsError:
    return False


def _shard_texts(source: str, shard_documents: int, max_documents: int | None) -> Iterator[list[str]]:
  texts = []
  for n, doc in enumerate(data_lib.documents(source)):
    if max_documents is not None and n >= max_documents:
      break
    texts.append(doc.text)
    if len(texts) == shard_documents:
      yield texts
      texts = []
  if texts:
    yield texts


def _write_shards(root: epath.Path, source: str, tokenizer: str, dtype: str, shard_documents: int,
                  num_workers: int, max_documents: int | None, progress: bool) -> int:
  """Tokenize and write every shard that is not complete yet, in order; returns the number of shards."""
  pool = None
  if num_workers:
    # spawn, not fork: tokenizer libraries (and jax, when imported) run threads that fork would break.
    pool = multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, (tokenizer,))
  else:
    _init_worker(tokenizer)
  pending = collections.deque()
  n_shards = 0
  with tqdm(total=max_documents, unit="doc", desc="prepare", disable=not progress) as bar:

    def write_ready(keep: int) -> None:
      while len(pending) > keep:
        i, result, n_docs = pending.popleft()
        index, payload = result.get() if pool else result
        tokens_path, index_path = _shard_paths(root, i)
        _atomic_write(tokens_path, payload)
        _atomic_write(index_path, _npy_bytes(index))  # last: its presence marks the shard complete
        bar.update(n_docs)

    try:
      for i, texts in enumerate(_shard_texts(source, shard_documents, max_documents)):
        n_shards = i + 1
        if _shard_done(root, i, np.dtype(dtype).itemsize):
          bar.update(len(texts))
          continue
        pending.append((i, pool.apply_async(_encode_shard, (texts, dtype)) if pool else
                        _encode_shard(texts, dtype), len(texts)))
        write_ready(2 * num_workers)  # bounded: at most ~2 shards of text per worker in flight
      write_ready(0)
    finally:
      if pool is not None:
        pool.terminate()
  return n_shards


def _write_manifest(root: epath.Path, settings: dict, n_shards: int) -> dict:
  """index.npy (every shard's index) and then manifest.json, once all shards are complete."""
  shard_index = [_load_npy(_shard_paths(root, i)[1]) for i in range(n_shards)]
  index = np.concatenate(shard_index, axis=1) if shard_index else np.zeros((2, 0), np.int64)
  if not index[0].sum():
    raise RecordsError(f"{settings['source']}: empty corpus ({index.shape[1]} documents, no tokens)")
  _atomic_write(root / "index.npy", _npy_bytes(index))
  manifest = {**settings, "documents": int(index.shape[1]), "tokens": int(index[0].sum()),
              "shards": [{"documents": int(x.shape[1]), "tokens": int(x[0].sum())} for x in shard_index]}
  _atomic_write(root / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
  return manifest


def prepare(source: str, out: str | epath.PathLike, *, tokenizer: str = "byte", shard_documents: int = 1024,
            num_workers: int = 0, max_documents: int | None = None, progress: bool = True) -> dict:
  """Tokenize `source` (any lrjax.data source) into the prepared directory `out`; resumable.

  Args:
    source: an lrjax.data source string.
    out: the output directory (created; any epath location).
    tokenizer: a lrjax.tokenizers.load_tokenizer spec; workers load it from this spec.
    shard_documents: documents per shard.
    num_workers: tokenizing processes (0: tokenize in this process). The main process reads the source
      and writes shards in order; workers only tokenize.
    max_documents: stop after this many documents (None: all).
    progress: a tqdm bar over documents.
  Returns:
    the manifest dict.
  Raises:
    RecordsError for bad settings, a directory prepared with other settings, or an empty corpus;
    lrjax.data.DataError / lrjax.tokenizers.TokenizerError for an unreadable source or tokenizer.
  """
  if shard_documents < 1 or num_workers < 0 or (max_documents is not None and max_documents < 1):
    raise RecordsError(f"prepare: need shard_documents >= 1, num_workers >= 0, max_documents >= 1 or None; got "
                       f"{shard_documents}, {num_workers}, {max_documents}")
  data_lib.parse_source(source)  # a bad source fails here, before anything is written
  root = epath.Path(out)
  tok = tokenizers_lib.load_tokenizer(tokenizer)
  dtype = "<u2" if tok.vocab_size <= 1 << 16 else "<i4"
  settings = {"format": FORMAT, "source": source, "tokenizer": tokenizer_identity(tok, tokenizer),
              "shard_documents": shard_documents, "max_documents": max_documents, "dtype": dtype}
  settings_path = root / "prepare.json"
  if settings_path.exists():
    old = json.loads(settings_path.read_text())
    if old != settings:
      diff = ", ".join(k for k in settings if old.get(k) != settings[k])
      raise RecordsError(f"{root} holds data prepared with other settings ({diff} differ); use a new directory")
    if (root / "manifest.json").exists():
      return json.loads((root / "manifest.json").read_text())
  (root / "shards").mkdir(parents=True, exist_ok=True)
  _atomic_write(settings_path, json.dumps(settings, indent=1, sort_keys=True).encode())
  n_shards = _write_shards(root, source, tokenizer, dtype, shard_documents, num_workers, max_documents, progress)
  return _write_manifest(root, settings, n_shards)


# ----------------------------------------------------------------------------------------------------------
# Reading.


class Records:
  """A prepared directory opened for random access by document: only manifest.json and index.npy are read up
  front (24 bytes per document in memory); shard files are opened on first use and read by range.

  Args:
    path: the prepared directory (any epath location).
    tokenizer: the model's tokenizer (object or load_tokenizer spec); when given, data prepared with another
      tokenizer is refused (RecordsError "tokenizer mismatch between prepared data and model").

  Attributes:
    lengths: int64[N] token count of every document (no bookends).
    bos_id, eos_id, vocab_size: the recorded tokenizer's.
    fingerprint: a short hash of manifest.json (identifies the prepared data in iterator states).
  """

  def __init__(self, path: str | epath.PathLike, tokenizer: tokenizers_lib.Tokenizer | str | None = None):
    self.path = epath.Path(path)
    self.name = str(path)
    manifest_path = self.path / "manifest.json"
    if not manifest_path.exists():
      raise RecordsError(f"{manifest_path}: missing (not a prepared data directory, or prepare has not finished)")
    raw = manifest_path.read_bytes()
    try:
      manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordsError(f"{manifest_path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise RecordsError(f"{manifest_path}: not an {FORMAT} manifest")
    self.manifest, self.fingerprint = manifest, hashlib.sha256(raw).hexdigest()[:16]
    info = manifest["tokenizer"]
    self.bos_id, self.eos_id, self.vocab_size = info["bos_id"], info["eos_id"], info["vocab_size"]
    if tokenizer is not None:
      check_tokenizer(info, tokenizer, self.name)
    index = _load_npy(self.path / "index.npy")
    counts = np.array([s["documents"] for s in manifest["shards"]], np.int64)
    if index.shape != (2, manifest["documents"]) or counts.sum() != index.shape[1] or \
        index[0].sum() != manifest["tokens"]:
      raise RecordsError(f"{self.path / 'index.npy'}: corrupt index (does not match manifest.json)")
    self.lengths = index[0]
    self._crc = index[1].astype(np.uint32)
    self._dtype = np.dtype(manifest["dtype"])
    self._shard_starts = np.concatenate([[0], np.cumsum(counts)])
    ends = np.concatenate([[0], np.cumsum(self.lengths)])
    self._offsets = ends[:-1] - np.repeat(ends[self._shard_starts[:-1]], counts)  # token offset in its shard
    self._shard_tokens = [s["tokens"] for s in manifest["shards"]]
    self._files: dict = {}

  def __len__(self) -> int:
    return self.lengths.shape[0]

  def __getstate__(self) -> dict:  # open files stay behind (grain pickles the pipeline into workers)
    return {**self.__dict__, "_files": {}}

  def _file(self, shard: int):
    if shard not in self._files:
      path = _shard_paths(self.path, shard)[0]
      if not path.exists():
        raise RecordsError(f"{path}: missing shard (manifest.json lists {len(self._shard_tokens)})")
      expected = self._shard_tokens[shard] * self._dtype.itemsize
      if path.stat().length != expected:
        raise RecordsError(f"{path}: corrupt shard ({path.stat().length} bytes; the index says {expected})")
      self._files[shard] = path.open("rb")
    return self._files[shard]

  def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """i32[stop - start] tokens [start, stop) of document `doc` (default: all of it). A whole-document read
    is checked against its CRC32; every read checks the ids against the vocabulary size."""
    length = int(self.lengths[doc])
    stop = length if stop is None else stop
    if not 0 <= start <= stop <= length:
      raise RecordsError(f"{self.name}: document {doc} has {length} tokens; cannot read [{start}, {stop})")
    shard = int(np.searchsorted(self._shard_starts, doc, side="right")) - 1
    f = self._file(shard)
    f.seek((int(self._offsets[doc]) + start) * self._dtype.itemsize)
    payload = f.read((stop - start) * self._dtype.itemsize)
    where = f"{_shard_paths(self.path, shard)[0]}: corrupt record: document {doc}"
    if len(payload) != (stop - start) * self._dtype.itemsize:
      raise RecordsError(f"{where} is cut short")
    if start == 0 and stop == length and zlib.crc32(payload) != self._crc[doc]:
      raise RecordsError(f"{where} fails its CRC32 check")
    tokens = np.frombuffer(payload, self._dtype).astype(np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
      raise RecordsError(f"{where} holds ids outside [0, {self.vocab_size})")
    return tokens

  def verify(self) -> None:
    """Read every document whole (CRC32 and id checks); raises RecordsError at the first bad one."""
    for doc in range(len(self)):
      self.read(doc)

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files = {}


def run(config, workdir: str) -> str:
  """experiments/prepare_data.py: prepare config.source into workdir; returns the summary line."""
  schema.check(config, {"source": schema.STR, "tokenizer": schema.STR, "shard_documents": schema.POSITIVE_INT,
                        "num_workers": schema.NON_NEGATIVE_INT, "max_documents": schema.NON_NEGATIVE_INT,
                        "progress": schema.BOOL}, error=RecordsError)
  if not workdir:
    raise RecordsError("--workdir (the output directory) is required")
  manifest = prepare(config.source, workdir, tokenizer=config.tokenizer, shard_documents=config.shard_documents,
                     num_workers=config.num_workers, max_documents=config.max_documents or None,
                     progress=config.progress)
  return (f"{workdir}: {manifest['documents']} documents, {manifest['tokens']} tokens in "
          f"{len(manifest['shards'])} shards (tokenizer {manifest['tokenizer']['spec']}, "
          f"vocab {manifest['tokenizer']['vocab_size']})")
