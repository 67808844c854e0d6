"""Tokenizers behind one small interface: bytes (built in), SentencePiece (LLaMA 2), Hugging Face (LLaMA 3).

Every tokenizer has
  encode(text) -> i32[n]   token ids of the text alone: no BOS/EOS (lrjax.data adds BOS where wanted)
  decode(ids) -> str
  vocab_size: int          ids are in [0, vocab_size)
  bos_id, eos_id: int | None

`load_tokenizer(spec)`: "byte", a tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face tokenizers)
file, or a directory holding one (tokenizer.json is preferred when both exist, as transformers' fast
tokenizers do).

The byte tokenizer is the built-in model's: ids are the UTF-8 bytes, vocab 256, and there are no BOS/EOS ids
(every id is a byte; documents are separated by the trainer, not by special tokens), so bos_id and eos_id are
None and byte-level perplexity windows start at the document's first byte.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded; the message names the file and the problem."""


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ...


def _ids(ids) -> list[int]:
  return [int(i) for i in np.asarray(ids).reshape(-1)]


class ByteTokenizer:
  """UTF-8 bytes as ids (vocab 256, no BOS/EOS: see the module docstring)."""

  vocab_size = 256
  bos_id = None
  eos_id = None
  name = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise TokenizerError(f"byte ids must be in [0, 255], got {ids.min()}..{ids.max()}")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """A SentencePiece model file (LLaMA 1/2 tokenizer.model)."""

  def __init__(self, path: str):
    import sentencepiece

    self.name = path
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = _optional_id(self._sp.bos_id())
    self.eos_id = _optional_id(self._sp.eos_id())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds(_ids(ids))

  def __repr__(self):
    return f"SentencePieceTokenizer({self.name!r})"


def _optional_id(i: int) -> int | None:
  return None if i is None or i < 0 else int(i)


class HFTokenizer:
  """A Hugging Face `tokenizers` file (tokenizer.json; LLaMA 3).

  BOS/EOS come from tokenizer_config.json next to the file (bos_token / eos_token), else from the
  post-processor template (the special token before / after the sequence), else None.
  """

  def __init__(self, path: str):
    import tokenizers

    self.name = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
      raise TokenizerError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id = self._special_ids(path)

  def _special_ids(self, path: str) -> tuple[int | None, int | None]:
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.exists(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          config = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{config_path}: unreadable ({e})") from None
      return self._token_id(config.get("bos_token")), self._token_id(config.get("eos_token"))
    with open(path, encoding="utf-8") as f:
      post = (json.load(f) or {}).get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
      if proc.get("type") != "TemplateProcessing":
        continue
      single = proc.get("single", [])
      seq = [i for i, piece in enumerate(single) if "Sequence" in piece]
      if not seq:
        continue
      special = lambda piece: piece.get("SpecialToken", {}).get("id")
      before = [special(p) for p in single[:seq[0]] if "SpecialToken" in p]
      after = [special(p) for p in single[seq[0] + 1:] if "SpecialToken" in p]
      return (self._token_id(before[0]) if before else None, self._token_id(after[-1]) if after else None)
    return None, None

  def _token_id(self, token) -> int | None:
    if isinstance(token, dict):
      token = token.get("content")
    if not token:
      return None
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(_ids(ids), skip_special_tokens=False)

  def __repr__(self):
    return f"HFTokenizer({self.name!r})"


def find_tokenizer_file(directory: str) -> str | None:
  """The tokenizer file in a model directory (tokenizer.json first), or None."""
  for name in TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
  """A tokenizer from "byte", a tokenizer.json / *.model file, or a directory containing one."""
  spec = os.fspath(spec)
  if spec == "byte":
    return ByteTokenizer()
  if os.path.isdir(spec):
    path = find_tokenizer_file(spec)
    if path is None:
      raise TokenizerError(f"{spec}: no {' or '.join(TOKENIZER_FILES)} in this directory")
    spec = path
  if not os.path.exists(spec):
    raise TokenizerError(f"tokenizer {spec!r}: no such file or directory (expected 'byte', a tokenizer.json "
                         "or tokenizer.model file, or a directory holding one)")
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  raise TokenizerError(f"{spec}: unknown tokenizer file type (expected a .json tokenizers file or a .model "
                       "SentencePiece file)")
