"""Documents from text sources, and their token ids (training input: lrjax.records, lrjax.stream).

A source is one string, `SOURCE[?key=value&key=value]`:

  builtin:train | builtin:valid | builtin:test   the corpus shipped in lrjax/assets/corpus (jsonl.gz)
  path/to/file.jsonl, file.jsonl.gz              one document per line: {"id": ..., "text": ...}
                                                 (?field=NAME reads another text field)
  path/to/file.parquet                           one document per row of the text column (?field=NAME reads
                                                 another column; an "id" column, when present, names rows)
  path/to/file.txt (any other file; .gz ok)      one document: the whole file
  path/to/folder                                 one document per file matching ?pattern= (default *.txt),
                                                 sorted by relative path; "**/*.md" recurses
  tfds:NAME                                      a TensorFlow Datasets dataset already on disk:
                                                 ?split=test (default), ?data_dir=DIR, ?field=text
                                                 (PG19's text feature is book_text)
  SOURCE,SOURCE,...                              the documents of each source in turn (e.g. three text files)

Paths go through etils.epath, so gs:// (and any other filesystem epath reaches) works like a local path.
Order is deterministic (file order, sorted paths, TFDS index order), so the first N documents of a source are
always the same N. Documents are `Document(id, text)`; `tokenized_documents` turns them into i32 token arrays,
optionally prefixed with BOS and filtered by minimum length (long-document evaluation sets).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import posixpath
import re
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow
import pyarrow.parquet as pq
from etils import epath

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "assets", "corpus")
BUILTIN_SPLITS = ("train", "valid", "test")
_OPTIONS = {"field", "pattern", "split", "data_dir"}


class DataError(ValueError):
  """A data source that cannot be read, or that yields no usable documents; the message says which."""


class Document(NamedTuple):
  id: str
  text: str


class Source(NamedTuple):
  """A parsed source string (see the module docstring)."""
  kind: str  # "builtin", "jsonl", "parquet", "text", "folder", "tfds"
  location: str  # split name, path, or TFDS dataset name
  field: str = "text"
  pattern: str = "*.txt"
  split: str = "test"
  data_dir: str | None = None


def parse_source(spec: str) -> Source:
  """Parses `SOURCE[?key=value&...]`; raises DataError for unknown keys or a missing path."""
  spec = os.fspath(spec)
  location, options = spec, {}
  if "?" in spec and not epath.Path(spec).exists():
    location, query = spec.split("?", 1)
    for item in filter(None, query.split("&")):
      key, sep, value = item.partition("=")
      if not sep or key not in _OPTIONS:
        raise DataError(f"data source {spec!r}: bad option {item!r} (expected key=value with key in "
                        f"{', '.join(sorted(_OPTIONS))})")
      options[key] = value
  if not location:
    raise DataError(f"data source {spec!r}: empty path")
  if location.startswith("builtin:"):
    split = location.split(":", 1)[1]
    if split not in BUILTIN_SPLITS:
      raise DataError(f"data source {spec!r}: unknown built-in split {split!r}; expected one of "
                      f"{', '.join(BUILTIN_SPLITS)}")
    kind = "builtin"
    location = split
  elif location.startswith("tfds:"):
    kind, location = "tfds", location.split(":", 1)[1]
    if not location:
      raise DataError(f"data source {spec!r}: missing TFDS dataset name (tfds:NAME)")
  elif epath.Path(location).is_dir():
    kind = "folder"
  elif epath.Path(location).exists():
    kind = ("jsonl" if location.endswith((".jsonl", ".jsonl.gz")) else
            "parquet" if location.endswith(".parquet") else "text")
  else:
    raise DataError(f"data source {location!r}: no such file or directory (expected builtin:train|valid|test, "
                    "tfds:NAME, a .jsonl(.gz), .parquet or text file, or a folder)")
  file_only = {"pattern", "split", "data_dir"}
  inapplicable = {"builtin": file_only, "jsonl": file_only, "parquet": file_only, "text": file_only | {"field"},
                  "folder": {"field", "split", "data_dir"}, "tfds": {"pattern"}}[kind] & set(options)
  if inapplicable:
    raise DataError(f"data source {spec!r}: option(s) {', '.join(sorted(inapplicable))} do not apply to a "
                    f"{kind} source")
  return Source(kind, location, **options)


@contextlib.contextmanager
def _open_text(path: str) -> Iterator[io.TextIOBase]:
  """UTF-8 text of a (possibly gzipped) file on any epath filesystem."""
  with epath.Path(path).open("rb") as raw:
    binary = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
    with io.TextIOWrapper(binary, encoding="utf-8") as text:
      yield text


def _jsonl_documents(path: str, field: str) -> Iterator[Document]:
  try:
    with _open_text(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or field not in record:
          keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
          raise DataError(f"{path}:{lineno}: no {field!r} field (found: {keys})")
        text = record[field]
        if not isinstance(text, str):
          raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
        yield Document(str(record.get("id", f"{path}:{lineno}")), text)
  except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
    raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _text_document(path: str, doc_id: str) -> Document:
  try:
    with _open_text(path) as f:
      return Document(doc_id, f.read())
  except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
    raise DataError(f"{path}: not UTF-8 text ({type(e).__name__}: {e})") from None


def _parquet_documents(path: str, field: str) -> Iterator[Document]:
  """Rows of one column, streamed batch by batch (the file is never read whole)."""

  with epath.Path(path).open("rb") as f:
    try:
      table = pq.ParquetFile(f)
    except pyarrow.ArrowException as e:
      raise DataError(f"{path}: not a parquet file ({str(e).splitlines()[0]})") from None
    names = table.schema_arrow.names
    if field not in names:
      raise DataError(f"{path}: no {field!r} column (columns: {', '.join(names)}); choose one with ?field=")
    kind = table.schema_arrow.field(field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
      raise DataError(f"{path}: column {field!r} is {kind}, not a string")
    columns = [field] + (["id"] if "id" in names and field != "id" else [])
    row = 0
    for batch in table.iter_batches(batch_size=256, columns=columns):
      ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * batch.num_rows
      for doc_id, text in zip(ids, batch.column(field).to_pylist()):
        if text is None:
          raise DataError(f"{path}: row {row}: column {field!r} is null")
        yield Document(f"{path}:{row}" if doc_id is None else str(doc_id), text)
        row += 1


def _glob_regex(pattern: str) -> re.Pattern:
  """A relative-path glob as a regex: `*` and `?` stay within one directory, `**/` spans any number."""
  parts = re.split(r"(\*\*/|\*|\?)", pattern)
  table = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
  return re.compile("".join(table.get(p, re.escape(p)) for p in parts))


def _folder_documents(folder: str, pattern: str) -> Iterator[Document]:
  """Files by walking the tree (epath's glob has no `**`, and its fsspec glob mangles URIs). fsspec names the
  directories it walks without the protocol (gcsfs: "bucket/dir"), so names are made relative as strings."""
  root = epath.Path(folder)
  unprefixed = lambda path: os.fspath(path).split("://", 1)[-1].rstrip("/")
  base = unprefixed(root)
  match = _glob_regex(pattern).fullmatch
  files = sorted(rel for top, _, names in root.walk() for name in names
                 if match(rel := posixpath.join(unprefixed(top)[len(base):].lstrip("/"), name)))
  if not files:
    raise DataError(f"{folder}: no files match {pattern!r}")
  for rel in files:
    yield _text_document(os.fspath(root / rel), rel)


def _tfds_documents(name: str, split: str, data_dir: str | None, field: str) -> Iterator[Document]:
  """TFDS without downloading: tfds.data_source (ArrayRecord files; no tensorflow needed), else tfds.load
  (TFRecord files; needs tensorflow)."""
  import tensorflow_datasets as tfds  # here: only tfds: sources pay its import (seconds)

  label = f"tfds:{name} split {split!r}"
  try:
    examples = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    rows = (examples[i] for i in range(len(examples)))
  except Exception as e:  # noqa: BLE001  (TFDS raises many types; the message is passed on)
    source_error = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      raise DataError(f"{label}: cannot read it without downloading ({source_error}); tfds.data_source needs "
                      "the dataset prepared as ArrayRecord in data_dir, and TFRecord datasets need "
                      "tensorflow, which is not installed") from None
    try:
      rows = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, download=False))
    except Exception as e2:  # noqa: BLE001
      raise DataError(f"{label}: {source_error}; tfds.load: {str(e2).splitlines()[0]}") from None
  for i, row in enumerate(rows):
    if field not in row:
      raise DataError(f"{label}: no {field!r} feature (features: {', '.join(sorted(row))}); choose one with "
                      f"?field=")
    text = row[field]
    if isinstance(text, np.ndarray) and text.ndim == 0:
      text = text.item()
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
      raise DataError(f"{label}: feature {field!r} is {type(text).__name__}, not text")
    yield Document(f"{name}/{split}/{i}", text)


def documents(source: str | Source) -> Iterator[Document]:
  """The documents of a source, in a deterministic order (see the module docstring). "A,B,C" (sources joined
  by commas, none of which exists as a path with its comma) is their documents in turn."""
  if isinstance(source, str) and "," in source and not epath.Path(source.split("?", 1)[0]).exists():
    parts = [parse_source(part) for part in source.split(",")]  # all checked before any is read
    return (doc for part in parts for doc in documents(part))
  src = parse_source(source) if isinstance(source, str) else source
  if src.kind == "builtin":
    path = os.path.join(BUILTIN_DIR, f"{src.location}.jsonl.gz")
    if not os.path.exists(path):
      raise DataError(f"built-in corpus split {src.location!r} is missing: {path}")
    return _jsonl_documents(path, src.field)
  if src.kind == "jsonl":
    return _jsonl_documents(src.location, src.field)
  if src.kind == "parquet":
    return _parquet_documents(src.location, src.field)
  if src.kind == "text":
    return iter([_text_document(src.location, src.location)])
  if src.kind == "folder":
    return _folder_documents(src.location, src.pattern)
  return _tfds_documents(src.location, src.split, src.data_dir, src.field)


def tokenized_documents(source: str | Source, tokenizer, *, min_tokens: int = 0,
                        max_documents: int | None = None, add_bos: bool | None = None) -> list[np.ndarray]:
  """Token ids of a source's documents, in source order.

  Args:
    source: a source string or parsed Source.
    tokenizer: anything with encode(text) -> ids and bos_id (lrjax.tokenizers).
    min_tokens: keep only documents with at least this many tokens (BOS included); 0 keeps all, even empty.
    max_documents: stop after this many kept documents (the rest of the source is not read).
    add_bos: prefix each document with tokenizer.bos_id. None: exactly when the tokenizer adds one to model
      input (tokenizer.add_bos; the perplexity protocol: a window is then BOS + the document's first L-1 tokens).
      True without a BOS id is an error.
  Returns:
    a list of i32[n_i] arrays.
  Raises:
    DataError when nothing is left ("0 of 16 documents have >= 16384 tokens (longest: 9876)").
  """
  bos = getattr(tokenizer, "bos_id", None)
  if add_bos is None:  # the checkpoint's rule (tokenizer.add_bos: SmolLM2 adds none although it has a BOS id)
    add_bos = getattr(tokenizer, "add_bos", bos is not None)
  elif add_bos and bos is None:
    raise DataError(f"add_bos=True but tokenizer {tokenizer!r} has no BOS id")
  if max_documents is not None and max_documents < 1:
    raise DataError(f"max_documents must be >= 1, got {max_documents}")
  name = source if isinstance(source, str) else f"{source.kind}:{source.location}"
  kept, seen, longest = [], 0, 0
  for doc in documents(source):
    seen += 1
    ids = np.asarray(tokenizer.encode(doc.text), np.int32)
    if add_bos:
      ids = np.concatenate([np.asarray([bos], np.int32), ids])
    longest = max(longest, ids.shape[0])
    if ids.shape[0] >= min_tokens:
      kept.append(ids)
      if max_documents is not None and len(kept) >= max_documents:
        break
  if not kept:
    if seen == 0:
      raise DataError(f"{name}: no documents")
    raise DataError(f"{name}: 0 of {seen} documents have >= {min_tokens} tokens (longest: {longest})")
  return kept
