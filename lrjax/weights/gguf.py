"""GGUF checkpoints (llama.cpp's single-file format) in: an HF config, HF-named float32 tensors, the tokenizer.

A .gguf file carries what an HF directory keeps in config.json, the safetensors and tokenizer.json, as
metadata keys and tensors under llama.cpp's names. `read` turns it into those three; `load` goes on to
(ModelConfig, params) through the same HF path as every other checkpoint (lrjax.weights).

Tensor names (llama.cpp -> HF; torch [out, in] orientation in both, since ggml lists dims fastest first):

  token_embd            -> model.embed_tokens.weight      output_norm -> model.norm.weight
  output                -> lm_head.weight                 (absent: tied embeddings)
  blk.N.attn_norm       -> model.layers.N.input_layernorm.weight
  blk.N.ffn_norm        -> model.layers.N.post_attention_layernorm.weight
  blk.N.attn_q/k/v/output -> model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj.weight
  blk.N.ffn_gate/up/down  -> model.layers.N.mlp.gate_proj/up_proj/down_proj.weight

q/k rows: ggml's rope rotates adjacent pairs (2j, 2j+1), so llama.cpp's converter (convert_hf_to_gguf.py,
LlamaModel.permute) reorders every head's rows from HF's half-split layout into interleaved pairs, exactly the
Meta layout. We undo it with meta.meta_to_hf_qk: q with the head count, k with the kv head count (GQA).

Every tensor type gguf.quants.dequantize knows (F32, F16, BF16, Q4_0/Q4_1/Q5_x/Q8_0, the K- and IQ-quants...)
is read, as float32. Tensors are dequantized lazily from the memory-mapped file, one per lookup, so `load`
holds one dequantized tensor beside the params it is filling, never a second full copy.

The tokenizer comes from the tokenizer.ggml.* metadata, built as transformers builds it from the same file
(transformers/integrations/gguf/gguf_tokenizer_mapping.py): "gpt2" is byte-level BPE, "llama" the
SentencePiece-style BPE with byte fallback (merges from the file, else recovered from the piece scores).

Every problem raises GGUFError, one line naming the file; it is both a WeightsError and a TokenizerError, so
callers of either loader catch it as they already do.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Iterator, Mapping, NamedTuple

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from lrjax import model as model_lib
from lrjax import tokenizers
from lrjax.weights import arch, meta
from lrjax.weights.common import WeightsError, dtype_name, np_dtype

ARCHITECTURES = ("llama",)
TOKENIZER_MODELS = ("gpt2", "llama")
_MAGIC = b"GGUF"
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp token types (gguf.TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (added, not special).
_CONTROL, _USER_DEFINED = 3, 4
# Pre-tokenizer splits transformers applies for these tokenizer.ggml.pre values (LLaMA 3's regex); every other
# value keeps GPT-2's ByteLevel regex, as in transformers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}


class GGUFError(WeightsError, tokenizers.TokenizerError):
  """A GGUF file that cannot be read or mapped; the message names the file and the problem."""


class GGUFCheckpoint(NamedTuple):
  """What `read` returns.

  config: an HF LlamaForCausalLM config.json dict.
  tensors: HF name -> float32 array in HF shape ([out, in] for linears), dequantized on each lookup.
  tokenizer: the file's tokenizer, or None when it has no tokenizer.ggml.model.
  metadata: every metadata key -> its value (strings, numbers, lists).
  """

  config: dict
  tensors: Mapping[str, np.ndarray]
  tokenizer: tokenizers.HFTokenizer | None
  metadata: dict


# ----------------------------------------------------------------------------------------------------------
# The file.


def _open(path: str):
  """(GGUFReader, metadata dict); a bad file raises GGUFError."""
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise GGUFError(f"{path}: cannot open ({e.strerror or e})") from None
  if magic != _MAGIC:
    raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
  try:
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
    # The reader maps the file and slices it by the sizes the header states: a short file fails a reshape.
    raise GGUFError(f"{path}: truncated or corrupt GGUF file ({str(e).splitlines()[0]})") from None
  return reader, metadata


@functools.lru_cache(maxsize=None)
def _dequantizable(qtype) -> bool:
  """Whether gguf.quants implements this type (the integer and F64 types, which are not weights, it does not)."""
  try:  # one zero block: cheap, and exactly the question
    gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
  except NotImplementedError:
    return False
  return True


class _Tensor(NamedTuple):
  source: object        # gguf.ReaderTensor
  shape: tuple          # HF shape
  qk_heads: int | None  # heads to un-permute rows with (q, k), else None


class _LazyTensors(Mapping):
  """HF name -> float32 array, dequantized from the memory-mapped file on every lookup (nothing is cached)."""

  def __init__(self, table: dict[str, _Tensor], path: str):
    self._table, self._path = table, path

  def shapes(self) -> dict[str, tuple]:
    return {name: t.shape for name, t in self._table.items()}

  def __getitem__(self, name: str) -> np.ndarray:
    t = self._table[name]
    try:
      w = np.asarray(gguf.quants.dequantize(t.source.data, t.source.tensor_type), np.float32).reshape(t.shape)
    except ValueError as e:
      raise GGUFError(f"{self._path}: corrupt tensor {t.source.name} ({e})") from None
    return meta.meta_to_hf_qk(w, t.qk_heads) if t.qk_heads else w

  def __iter__(self) -> Iterator[str]:
    return iter(self._table)

  def __len__(self) -> int:
    return len(self._table)


def _hf_name(name: str) -> str | None:
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
  if m:
    layer = _LAYER_NAMES.get(m.group(2))
    return f"model.layers.{int(m.group(1))}.{layer}.weight" if layer else None
  m = re.fullmatch(r"(\w+)\.weight", name)
  return f"{_GLOBAL_NAMES[m.group(1)]}.weight" if m and m.group(1) in _GLOBAL_NAMES else None


def _tensor_table(reader, config: dict, path: str) -> dict[str, _Tensor]:
  """HF name -> _Tensor for every tensor; unmappable names and unreadable types raise GGUFError."""
  unmapped = [t.name for t in reader.tensors if _hf_name(t.name) is None]
  if unmapped:
    more = f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else ""
    hint = " (per-frequency RoPE factors, as llama.cpp writes for Llama 3.1, are not supported)" \
        if any(n.startswith("rope_") for n in unmapped) else ""
    raise GGUFError(f"{path}: tensor {', '.join(unmapped[:3])}{more} has no LLaMA counterpart{hint}")
  bad = sorted({t.tensor_type.name for t in reader.tensors if not _dequantizable(t.tensor_type)})
  if bad:
    raise GGUFError(f"{path}: unsupported tensor type {', '.join(bad)} (gguf.quants cannot dequantize it)")
  heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
  table = {}
  for t in reader.tensors:
    m = re.fullmatch(r"blk\.\d+\.(attn_q|attn_k)\.weight", t.name)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    table[_hf_name(t.name)] = _Tensor(t, shape, heads[m.group(1)] if m else None)
  return table


# ----------------------------------------------------------------------------------------------------------
# Config.


def hf_config(metadata: Mapping, tensor_names: set[str] | frozenset[str], *, source: str = "gguf") -> dict:
  """An HF LlamaForCausalLM config.json dict from GGUF metadata and the file's (llama.cpp) tensor names."""
  arch = metadata.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{source}: unsupported GGUF architecture {arch!r} (lrjax reads {', '.join(ARCHITECTURES)})")
  get = lambda key, default=None: metadata.get(f"{arch}.{key}", default)
  required = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.layer_norm_rms_epsilon")
  missing = [f"{arch}.{k}" for k in required if get(k) is None]
  if missing:
    raise GGUFError(f"{source}: missing metadata {', '.join(missing)}")
  heads = int(get("attention.head_count"))
  head_dim = int(get("attention.key_length") or get("embedding_length") // heads)
  rotary = get("rope.dimension_count")
  if rotary is not None and int(rotary) != head_dim:
    raise GGUFError(f"{source}: {arch}.rope.dimension_count={rotary} differs from head_dim {head_dim} (partial "
                    "rotary LLaMA is not supported)")
  tokens = metadata.get("tokenizer.ggml.tokens")
  vocab = get("vocab_size") or (len(tokens) if tokens else None)
  if vocab is None:
    raise GGUFError(f"{source}: missing metadata {arch}.vocab_size (and no tokenizer.ggml.tokens to count)")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": int(vocab),
      "hidden_size": int(get("embedding_length")), "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv") or heads), "head_dim": head_dim,
      "hidden_act": "silu", "max_position_embeddings": int(get("context_length")),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(get, arch, source),
      # llama.cpp writes output.weight only when it differs from the embedding (as transformers reads it).
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": False, "mlp_bias": False, "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
  }


def _rope_scaling(get, arch: str, source: str) -> dict | None:
  """The HF rope_scaling dict of llama.cpp's {arch}.rope.scaling.* keys (or the older rope.scale_linear)."""
  kind = get("rope.scaling.type")
  factor = get("rope.scaling.factor")
  if kind is None and get("rope.scale_linear") is not None:
    kind, factor = "linear", get("rope.scale_linear")
  if kind in (None, "none") or (kind == "linear" and factor == 1.0):
    return None
  if factor is None:
    raise GGUFError(f"{source}: {arch}.rope.scaling.type={kind!r} without {arch}.rope.scaling.factor")
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(factor)}
  if kind == "yarn":
    # llama.cpp's attention-factor keys rescale its own mscale; they have no exact HF yarn counterpart.
    odd = [k for k in ("attn_factor", "yarn_log_multiplier", "yarn_ext_factor", "yarn_attn_factor")
           if get(f"rope.scaling.{k}") is not None]
    if odd:
      raise GGUFError(f"{source}: yarn key {arch}.rope.scaling.{odd[0]} is not supported")
    original = get("rope.scaling.original_context_length")
    if original is None:
      raise GGUFError(f"{source}: yarn rope scaling without {arch}.rope.scaling.original_context_length")
    out = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original)}
    for key in ("beta_fast", "beta_slow"):
      if get(f"rope.scaling.yarn_{key}") is not None:
        out[key] = float(get(f"rope.scaling.yarn_{key}"))
    return out
  raise GGUFError(f"{source}: unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")


# ----------------------------------------------------------------------------------------------------------
# Public API.


def read(path: str | os.PathLike) -> GGUFCheckpoint:
  """Reads a .gguf file: HF config dict, lazily dequantized HF-named float32 tensors, tokenizer, metadata."""
  path = os.fspath(path)
  reader, metadata = _open(path)
  config = hf_config(metadata, {t.name for t in reader.tensors}, source=path)
  tensors = _LazyTensors(_tensor_table(reader, config, path), path)
  tokenizer = tokenizer_from_metadata(metadata, path) if "tokenizer.ggml.model" in metadata else None
  return GGUFCheckpoint(config, tensors, tokenizer, metadata)


def load(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig, params) from a .gguf file, params as host numpy arrays in lrjax's layout.

  dtype: "float32" | "bfloat16" | "float16", or None for float32 (what dequantization gives).
  Tensors are dequantized and placed one at a time.
  """
  path = os.fspath(path)
  reader, metadata = _open(path)
  config = hf_config(metadata, {t.name for t in reader.tensors}, source=path)
  try:
    cfg = arch.config_from_hf(config)
  except WeightsError as e:
    raise GGUFError(f"{path}: {e}") from None
  tensors = _LazyTensors(_tensor_table(reader, config, path), path)
  try:
    params = arch.assemble(cfg, tensors.shapes(), tensors.__getitem__, path, np_dtype(dtype))
  except GGUFError:
    raise
  except WeightsError as e:
    raise GGUFError(str(e)) from None
  return cfg.replace(param_dtype=dtype_name(params["embed"].dtype)), params


def load_tokenizer(path: str | os.PathLike) -> tokenizers.HFTokenizer:
  """The tokenizer of a .gguf file (its tokenizer.ggml.* metadata), without touching the tensors."""
  path = os.fspath(path)
  _, metadata = _open(path)
  if "tokenizer.ggml.model" not in metadata:
    raise GGUFError(f"{path}: no tokenizer in this GGUF file (no tokenizer.ggml.model)")
  return tokenizer_from_metadata(metadata, path)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer.


def tokenizer_from_metadata(metadata: Mapping, source: str = "gguf") -> tokenizers.HFTokenizer:
  """An HFTokenizer from tokenizer.ggml.* metadata, equal to what transformers builds from the same file.

  "gpt2": byte-level BPE (GPT-2's pre-tokenizer, or LLaMA 3's split for the llama3 family of
  tokenizer.ggml.pre values); add_bos defaults to False. "llama": SentencePiece-style BPE with byte fallback
  and a "▁" prefix on the first word; add_bos defaults to True (llama.cpp and transformers add BOS to a
  SentencePiece vocabulary that does not say otherwise). Control tokens and bos/eos/unk/pad (and, byte-level,
  "<|endoftext|>") are special added tokens, user-defined ones plain added tokens: both match whole in text.
  """
  kind = metadata.get("tokenizer.ggml.model")
  if kind not in TOKENIZER_MODELS:
    raise GGUFError(f"{source}: unsupported tokenizer.ggml.model {kind!r} (supported: {', '.join(TOKENIZER_MODELS)})")
  tokens = metadata.get("tokenizer.ggml.tokens")
  if not tokens:
    raise GGUFError(f"{source}: missing metadata tokenizer.ggml.tokens")
  key = lambda name: metadata.get(f"tokenizer.ggml.{name}")
  ids = {name: key(f"{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
  for name, i in ids.items():
    if i is not None and not 0 <= i < len(tokens):
      raise GGUFError(f"{source}: tokenizer.ggml.{name}_token_id={i} is outside the vocabulary of {len(tokens)}")
  tok = _byte_level_bpe(metadata, tokens, source) if kind == "gpt2" else _sentencepiece_bpe(metadata, tokens, source)
  _add_special_tokens(tok, tokens, key("token_type") or (), ids, byte_level=kind == "gpt2")
  add_bos = key("add_bos_token")
  specials = {"bos_token": ids["bos"], "eos_token": ids["eos"], "unk_token": ids["unknown"],
              "pad_token": ids["padding"]}
  return tokenizers.HFTokenizer(
      tok, name=source, bos_id=ids["bos"], eos_id=ids["eos"],
      add_bos=bool(kind == "llama" if add_bos is None else add_bos), add_eos=bool(key("add_eos_token")),
      chat_template=metadata.get("tokenizer.chat_template"),
      special_tokens={k: tokens[i] for k, i in specials.items() if i is not None})


@functools.lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
  """GPT-2's byte -> printable character table (bytes_to_unicode): printable Latin-1 maps to itself, the rest
  to 256 + n in byte order."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  moved = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def _merges(metadata: Mapping, tokens: list[str], source: str) -> list[tuple[str, str]]:
  """The file's merges, else those its piece scores imply (over the tokens as stored, as transformers does)."""
  merges = metadata.get("tokenizer.ggml.merges")
  if merges is not None:
    return [tuple(m.split(" ")) for m in merges]
  scores = metadata.get("tokenizer.ggml.scores")
  if scores is None:
    raise GGUFError(f"{source}: neither tokenizer.ggml.merges nor tokenizer.ggml.scores to build BPE merges from")
  return merges_from_scores({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))


def merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
  """BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces, best score first.

  SentencePiece BPE merges the pair whose joined piece scores highest. Ties go to the longer left, then longer
  right piece, and within a piece to the split with the smaller ids (transformers' generate_merges order).
  """
  merges = []
  for piece, score in scores.items():
    local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable, so ties keep the order above
  return [(left, right) for left, right, _ in merges]


def _byte_level_bpe(metadata: Mapping, tokens: list[str], source: str):
  spelling = _byte_spelling()
  alphabet = set(spelling.values())
  # Tokens outside the byte alphabet (a few files store raw text) are respelled byte by byte, as transformers does.
  vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(metadata, tokens, source), dropout=None,
                             continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  split = _PRE_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece_bpe(metadata: Mapping, tokens: list[str], source: str):
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(metadata, tokens, source), fuse_unk=True, byte_fallback=True,
                             dropout=None))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(content=" ", left=1)])
  return tok


def _add_special_tokens(tok, tokens: list[str], token_types, ids: Mapping[str, int | None], *,
                        byte_level: bool) -> None:
  vocab = tok.get_vocab()
  spelled = set(_byte_spelling().values()) if byte_level else None
  named = {i for i in ids.values() if i is not None}
  special = [i for i, kind in enumerate(token_types) if kind == _CONTROL
             and (spelled is None or set(tokens[i]) <= spelled)]  # outside the alphabet: a llama.cpp mislabel
  # transformers' GPT2Tokenizer also makes GPT-2's "<|endoftext|>" special (it appends it when absent, growing the
  # vocabulary past the model's: not followed).
  if byte_level and "<|endoftext|>" in vocab:
    named.add(vocab["<|endoftext|>"])
  special += sorted(i for i in named if i not in special)
  tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in sorted(special)])
  plain = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab]
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
