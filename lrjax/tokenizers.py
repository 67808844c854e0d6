"""Tokenizers behind one small interface: bytes (built in), SentencePiece (LLaMA 2), Hugging Face (LLaMA 3), GGUF.

Every tokenizer has
  encode(text) -> i32[n]   token ids of the text alone: no BOS/EOS (lrjax.data adds BOS where wanted)
  decode(ids) -> str
  vocab_size: int          ids are in [0, vocab_size)
  bos_id, eos_id: int | None
  add_bos, add_eos: bool   whether the checkpoint's own tokenizer adds BOS / EOS to model input
  chat_template: str | None, and apply_chat_template(messages) -> str rendering it as transformers does

`load_tokenizer(spec)`: "byte", a tokenizer.model (SentencePiece), tokenizer.json (Hugging Face tokenizers) or
.gguf file (its tokenizer.ggml.* metadata, see lrjax.weights.gguf), or a directory holding a tokenizer.json /
tokenizer.model (tokenizer.json is preferred when both exist, as transformers' fast tokenizers do).

add_bos / add_eos follow what transformers 5 does with the same files: for a tokenizer.json, its post-processor
(a special token before / after the sequence; transformers 5 ignores tokenizer_config.json's add_bos_token /
add_eos_token beside a tokenizer.json); for a tokenizer.model, those tokenizer_config.json flags, defaulting to
BOS yes, EOS no (LLaMA 1/2: Meta's and llama.cpp's encoders add BOS); for a .gguf, its
tokenizer.ggml.add_bos_token / add_eos_token (see lrjax.weights.gguf). A flag is never True without its id. The chat
template is a chat_template.jinja beside the file, else tokenizer_config.json's chat_template (both as
transformers reads them), else the GGUF's tokenizer.chat_template.

The byte tokenizer is the built-in model's: ids are the UTF-8 bytes, vocab 256, and there are no BOS/EOS ids
(every id is a byte; documents are separated by the trainer, not by special tokens), so bos_id and eos_id are
None, add_bos/add_eos False, and byte-level perplexity windows start at the document's first byte.

Chat templates render in jinja2's immutable sandbox with transformers' settings (trim_blocks, lstrip_blocks,
loop controls, raise_exception, strftime_now, a non-escaping tojson, {% generation %} blocks) and the
tokenizer's special tokens (bos_token, eos_token, unk_token, pad_token) as variables.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Mapping, Protocol, Sequence, runtime_checkable

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import sentencepiece
import tokenizers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded or used; the message names the file and the problem."""


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  add_bos: bool
  add_eos: bool
  chat_template: str | None

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ...

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    ...


def _ids(ids) -> list[int]:
  return [int(i) for i in np.asarray(ids).reshape(-1)]


class _ChatTemplated:
  """apply_chat_template over the subclass's chat_template and special_tokens ({"bos_token": "<s>", ...})."""

  name: str
  add_bos = False
  add_eos = False
  chat_template: str | None = None
  special_tokens: Mapping[str, str] = {}

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat as the model's template writes it (a string; encode it to get ids, BOS included if it has one)."""
    if self.chat_template is None:
      raise TokenizerError(f"{self.name}: this tokenizer has no chat template")
    return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                **self.special_tokens)


class ByteTokenizer(_ChatTemplated):
  """UTF-8 bytes as ids (vocab 256, no BOS/EOS, no chat template: see the module docstring)."""

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


class SentencePieceTokenizer(_ChatTemplated):
  """A SentencePiece model file (LLaMA 1/2 tokenizer.model); add_bos defaults to True, as in LlamaTokenizer."""

  def __init__(self, path: str):

    self.name = path
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = _optional_id(self._sp.bos_id())
    self.eos_id = _optional_id(self._sp.eos_id())
    config, self.chat_template = _tokenizer_config(path)
    config = config or {}
    self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
    self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id is not None
    pieces = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": _optional_id(self._sp.unk_id()),
              "pad_token": _optional_id(self._sp.pad_id())}
    self.special_tokens = {k: _token_str(config[k]) if config.get(k) else self._sp.IdToPiece(i)
                           for k, i in pieces.items() if config.get(k) or i is not None}

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds(_ids(ids))

  def __repr__(self):
    return f"SentencePieceTokenizer({self.name!r})"


def _optional_id(i: int) -> int | None:
  return None if i is None or i < 0 else int(i)


def _token_str(token) -> str | None:
  """A special token as tokenizer_config.json writes it (a string or an AddedToken dict) -> its text."""
  if isinstance(token, dict):
    token = token.get("content")
  return token or None


class HFTokenizer(_ChatTemplated):
  """A Hugging Face `tokenizers.Tokenizer` (from a tokenizer.json: LLaMA 3; or built from GGUF metadata).

  Args:
    tokenizer: the tokenizers.Tokenizer (encode never adds special tokens; added tokens match whole in text).
    name: where it came from, for messages.
    bos_id, eos_id: the BOS / EOS ids, or None.
    add_bos, add_eos: whether the checkpoint's tokenizer adds them to model input (False without the id).
    chat_template: the jinja chat template, or None.
    special_tokens: {"bos_token": text, ...} as the template sees them.
  """

  def __init__(self, tokenizer, *, name: str, bos_id: int | None = None, eos_id: int | None = None,
               add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None,
               special_tokens: Mapping[str, str] | None = None):
    self._tok = tokenizer
    self.name = name
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id = bos_id, eos_id
    self.add_bos = bool(add_bos) and bos_id is not None
    self.add_eos = bool(add_eos) and eos_id is not None
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})

  @classmethod
  def from_file(cls, path: str) -> "HFTokenizer":
    """A tokenizer.json file, with tokenizer_config.json beside it when present.

    BOS/EOS ids: the config's bos_token / eos_token, else the post-processor template's special tokens before /
    after the sequence. add_bos / add_eos: whether that template puts them there (transformers 5 drops the
    config's add_bos_token / add_eos_token whenever a tokenizer.json exists; the file's post-processor decides).
    """

    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
      raise TokenizerError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    with open(path, encoding="utf-8") as f:
      before, after = _template_specials((json.load(f) or {}).get("post_processor") or {})
    config, chat_template = _tokenizer_config(path)
    token_id = lambda token: None if not _token_str(token) else tok.token_to_id(_token_str(token))
    if config is not None:
      bos_id, eos_id = token_id(config.get("bos_token")), token_id(config.get("eos_token"))
      specials = {k: _token_str(config[k]) for k in _SPECIAL_NAMES if _token_str(config.get(k))}
    else:
      bos_id = token_id(before[0]) if before else None
      eos_id = token_id(after[-1]) if after else None
      specials = {k: tok.id_to_token(i) for k, i in (("bos_token", bos_id), ("eos_token", eos_id)) if i is not None}
    return cls(tok, name=path, bos_id=bos_id, eos_id=eos_id, add_bos=bool(before), add_eos=bool(after),
               chat_template=chat_template, special_tokens=specials)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(_ids(ids), skip_special_tokens=False)

  def __repr__(self):
    return f"HFTokenizer({self.name!r})"


def _template_specials(post: dict) -> tuple[list[str], list[str]]:
  """The special tokens a tokenizer.json post-processor puts before and after a single sequence."""
  processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
  for proc in processors:
    single = proc.get("single", []) if proc.get("type") == "TemplateProcessing" else []
    seq = [i for i, piece in enumerate(single) if "Sequence" in piece]
    if seq:
      special = lambda pieces: [p["SpecialToken"]["id"] for p in pieces if "SpecialToken" in p]
      return special(single[:seq[0]]), special(single[seq[0] + 1:])
  return [], []


def _tokenizer_config(path: str) -> tuple[dict | None, str | None]:
  """(tokenizer_config.json beside `path` or None, the chat template from chat_template.jinja or from it)."""
  directory = os.path.dirname(os.path.abspath(path))
  config_path = os.path.join(directory, "tokenizer_config.json")
  config = None
  if os.path.exists(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise TokenizerError(f"{config_path}: unreadable ({e})") from None
    if not isinstance(config, dict):
      raise TokenizerError(f"{config_path}: expected a JSON object")
  template = (config or {}).get("chat_template")
  if isinstance(template, list):  # named templates (transformers): the "default" one is the chat template
    template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(jinja_path):  # takes priority over the config's entry, as in transformers
    with open(jinja_path, encoding="utf-8") as f:
      template = f.read()
  if template is not None and not isinstance(template, str):
    raise TokenizerError(f"{config_path}: chat_template must be a string, got {type(template).__name__}")
  return config, template


# ----------------------------------------------------------------------------------------------------------
# Chat templates.


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
  """A jinja2 template compiled the way transformers compiles chat templates (chat_template_utils.py)."""

  class Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks the assistant's text for transformers' masks; here it only
    renders its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         **variables) -> str:
  """Renders a chat template over `messages` ([{"role", "content", ...}]) as transformers' apply_chat_template
  (tokenize=False) does: keys whose value is None are dropped; `variables` (bos_token, ...) are visible."""

  if not isinstance(messages, (list, tuple)) or not messages:
    raise TokenizerError("chat messages must be a non-empty list of dicts")
  if not all(isinstance(m, Mapping) for m in messages):
    raise TokenizerError(f"chat messages must be dicts, got {[type(m).__name__ for m in messages]}")
  chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
  try:
    return _compile_template(template).render(messages=chat, tools=None, documents=None,
                                              add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.TemplateError as e:
    raise TokenizerError(f"chat template: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ----------------------------------------------------------------------------------------------------------


def find_tokenizer_file(directory: str) -> str | None:
  """The tokenizer file in a model directory (tokenizer.json first), or None."""
  for name in TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
  """A tokenizer from "byte", a tokenizer.json / *.model / *.gguf file, or a directory holding a
  tokenizer.json / tokenizer.model."""
  spec = os.fspath(spec)
  if spec == "byte":
    return ByteTokenizer()
  if os.path.isdir(spec):
    path = find_tokenizer_file(spec)
    if path is None:
      raise TokenizerError(f"{spec}: no {' or '.join(TOKENIZER_FILES)} in this directory")
    spec = path
  if not os.path.exists(spec):
    raise TokenizerError(f"tokenizer {spec!r}: no such file or directory (expected 'byte', a tokenizer.json, "
                         "tokenizer.model or .gguf file, or a directory holding one)")
  if spec.endswith(".json"):
    return HFTokenizer.from_file(spec)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  if spec.endswith(".gguf"):
    from lrjax.weights import gguf  # builds on this module (and needs the optional gguf package)
    return gguf.load_tokenizer(spec)
  raise TokenizerError(f"{spec}: unknown tokenizer file type (expected a .json tokenizers file, a .model "
                       "SentencePiece file or a .gguf file)")
