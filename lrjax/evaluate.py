"""Perplexity: a pure per-window NLL, a cached jitted program, and the truncate / sliding-window protocols.

`window_nll` is the device function: forward at global positions 0..t-1, then the next-token NLL in sequence
chunks (lrjax.loss.chunked_nll), so [t, vocab] logits never exist. Its RoPE arrays are an argument: under
`compiled_window_nll` they are traced, so a new factor set (or another length's short/long choice) reuses
the compiled program; only a new (batch, length) shape compiles. It also vmaps over a stacked RopeArrays
(population-parallel search fitness).

Protocols (LongRoPE §2.4 / §4.1; Press et al. 2021), over documents of token ids, window length L:

  truncate  one window per document: BOS + its first L-1 tokens when the tokenizer has a BOS (the window is
            exactly L tokens), else its first L tokens. Every target in the window is scored.
  sliding   windows start every `stride` tokens of the document body (after BOS) and hold L-1 body tokens
            behind a BOS (L without BOS); a window scores only the tokens the previous window did not reach
            (Press et al.; the official LongRoPE and transformers loops), so with stride <= L-1 every token after
            the first is scored exactly once (with BOS, the first too). With stride > L-1 (the paper's Books3
            protocol: a 256k stride at 8k..2048k) the windows are disjoint samples of the document, each fully
            scored, and the tokens between them are not scored. The last window may be shorter; it is padded
            and its padding is not scored. A document shorter than L is one shorter window.

The BOS rule: a window starts with BOS exactly when the tokenizer prepends one to model input
(`tokenizer.add_bos`); documents then arrive with BOS first and every window is BOS + L-1 body tokens.

Reported: `ppl` = exp(mean over windows of each window's mean NLL), the LongRoPE figure, and beside it
`token_ppl` = exp(total NLL / total scored tokens). They agree whenever windows score equally many tokens
(truncate). Each window's RoPE arrays are config.rope_arrays(scaling, seq_len=its length), so the LongRoPE
short/long switch and dynamic NTK are decided per sequence length, as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import loss as loss_lib
from lrjax import model as model_lib
from lrjax import rope as rope_lib

PROTOCOLS = ("truncate", "sliding")
# Documents shorter than the window: an error, skipped, or kept as one shorter window (PG19: the paper scores
# the whole 100-book test split, short books included).
SHORT_DOCUMENT_POLICIES = ("error", "skip", "keep")
# Logits held at once by the chunked loss: batch * chunk * vocab floats (2^25 f32 = 128 MiB).
_LOSS_CHUNK_ELEMENTS = 2 ** 25


class EvalError(ValueError):
  """A perplexity request that cannot run (bad length, protocol, documents, tokens); the message says why."""


# ----------------------------------------------------------------------------------------------------------
# Device side.


def loss_chunk(batch: int, length: int, vocab: int) -> int:
  """Sequence chunk of the NLL: the largest power of two <= 2048 (and <= length) keeping batch * chunk *
  vocab f32 logits within 128 MiB, at least 16."""
  chunk = 2048
  while chunk > 16 and batch * chunk * vocab > _LOSS_CHUNK_ELEMENTS:
    chunk //= 2
  return max(1, min(chunk, length))


def window_nll(config: model_lib.ModelConfig, params: dict, tokens: jax.Array, rope: rope_lib.RopeArrays, *,
               weights: jax.Array | None = None, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed next-token NLL of each window.

  Args:
    config: the model's configuration (static).
    params: model parameters.
    tokens: i32[b, t] windows; token j sits at global position j.
    rope: RopeArrays for this length (inv_freq f32[layers, d/2], ...); traced.
    weights: optional f32[b, t-1], aligned with the targets tokens[:, 1:] (weights[:, j] weighs predicting
      token j+1 from tokens[:, :j+1]); None scores every target with weight 1.
    chunk: NLL sequence chunk (default: loss_chunk(b, t, vocab)).
  Returns:
    (nll_sum f32[b] in nats, count f32[b] = sum of weights).
  """
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  hidden = model_lib.forward(config, params, tokens, positions, rope)
  # Score all t positions (the last with weight 0) rather than slicing hidden to t-1: no copy, and t keeps
  # the power-of-two factors that make the loss chunks divide evenly.
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
  if weights is None:
    weights = jnp.ones((b, t - 1), jnp.float32)
  weights = jnp.concatenate([weights.astype(jnp.float32), jnp.zeros((b, 1), jnp.float32)], axis=1)
  chunk = loss_chunk(b, t, config.vocab_size) if chunk is None else chunk
  return loss_lib.chunked_nll(hidden, model_lib.head_weights(config, params), targets, weights, chunk=chunk)


@functools.lru_cache(maxsize=64)
def compiled_window_nll(config: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """jit(window_nll) for one model configuration: fn(params, tokens, rope, weights) -> (nll_sum, count).

  One compiled program per (batch, length) shape and dtype; rope and weights are traced, so new factor sets
  never recompile. With `mesh`, params follow lrjax.sharding's rules, windows are split over the batch axes
  (data, fsdp) and the sequence axis (ring attention when config.attention == "ring"), and tracing happens
  inside the mesh context so activation constraints apply.
  """
  def fn(params, tokens, rope, weights):
    return window_nll(config, params, tokens, rope, weights=weights)

  if mesh is None:
    return jax.jit(fn)
  from lrjax import sharding as sharding_lib
  jitted = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def run(params, tokens, rope, weights):
    with sharding_lib.mesh_context(mesh):
      return jitted(params, tokens, rope, weights)

  return run


# ----------------------------------------------------------------------------------------------------------
# Host side: windows.


class Window(NamedTuple):
  """One evaluation window of document `doc`: body tokens [start, end) behind an optional BOS; targets
  from body index `scored_from` on are scored."""
  doc: int
  start: int
  end: int
  scored_from: int


def document_body(doc: np.ndarray, bos_id: int | None) -> np.ndarray:
  """The document without its leading BOS (BOS is re-added to every window)."""
  if bos_id is not None and doc.shape[0] and doc[0] == bos_id:
    return doc[1:]
  return doc


def plan_windows(lengths: Sequence[int], length: int, *, protocol: str = "truncate", stride: int | None = None,
                 bos: bool = False) -> list[Window]:
  """Windows over documents with `lengths` body tokens (BOS excluded).

  Args:
    lengths: body length of each document.
    length: window length L in tokens, BOS included.
    protocol: "truncate" or "sliding".
    stride: sliding-window step in tokens, >= 1; <= L - 1 scores every token once, larger strides sample
      disjoint windows (see the module docstring); ignored by truncate.
    bos: whether each window starts with BOS.
  """
  if protocol not in PROTOCOLS:
    raise EvalError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
  width = length - int(bos)  # body tokens per window
  if width < 1 or length < 2:
    raise EvalError(f"length {length} is too short (at least 2 tokens{' with BOS' if bos else ''})")
  if protocol == "sliding":
    if stride is None or stride < 1:
      raise EvalError(f"sliding windows need a stride >= 1 (tokens between window starts), got {stride}")
  windows = []
  for d, n in enumerate(lengths):
    if protocol == "truncate":
      windows.append(Window(d, 0, min(width, n), 0))
      continue
    prev_end, start = 0, 0
    while True:
      end = min(start + width, n)
      windows.append(Window(d, start, end, prev_end if start else 0))
      prev_end = end
      start += stride
      if end >= n or start >= n:  # as the HF loop: windows start only inside the document
        break
  return windows


def window_arrays(documents: Sequence[np.ndarray], windows: Sequence[Window], length: int,
                  bos_id: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens i32[w, L], target-aligned weights f32[w, L-1], actual lengths i32[w]) of windows, zero-padded."""
  w = len(windows)
  tokens = np.zeros((w, length), np.int32)
  weights = np.zeros((w, length - 1), np.float32)
  sizes = np.zeros((w,), np.int32)
  off = int(bos_id is not None)
  for i, win in enumerate(windows):
    body = document_body(np.asarray(documents[win.doc]), bos_id)
    n = win.end - win.start
    if off:
      tokens[i, 0] = bos_id
    tokens[i, off:off + n] = body[win.start:win.end]
    # Body token j of the window sits at window position off + j - start; its target index is one less.
    first = max(win.scored_from, win.start + (1 - off))
    weights[i, first - win.start + off - 1:n + off - 1] = 1
    sizes[i] = n + off
  return tokens, weights, sizes


# ----------------------------------------------------------------------------------------------------------
# Perplexity.


@dataclasses.dataclass
class PerplexityResult:
  """Per-window NLL of one (length, setting) evaluation.

  window_nll / window_count: f64[w] summed NLL (nats) and scored tokens of each window; window_doc: i32[w]
  the document index of each window (into the documents actually evaluated).
  """
  length: int
  protocol: str
  stride: int | None
  num_documents: int
  window_nll: np.ndarray
  window_count: np.ndarray
  window_doc: np.ndarray

  @property
  def nll_sum(self) -> float:
    return float(self.window_nll.sum())

  @property
  def count(self) -> float:
    return float(self.window_count.sum())

  @property
  def num_windows(self) -> int:
    return int(self.window_nll.shape[0])

  @property
  def mean_nll(self) -> float:
    """Mean over windows of each window's mean NLL (nats per token)."""
    return float(np.mean(self.window_nll / self.window_count))

  @property
  def ppl(self) -> float:
    """exp(mean over windows of the per-window mean NLL): the LongRoPE / HF-per-window figure."""
    return math.exp(self.mean_nll)

  @property
  def token_ppl(self) -> float:
    """exp(total NLL / total scored tokens)."""
    return math.exp(self.nll_sum / self.count)

  def to_dict(self, windows: bool = False) -> dict:
    out = {"length": self.length, "protocol": self.protocol, "stride": self.stride,
           "num_documents": self.num_documents, "num_windows": self.num_windows, "ppl": self.ppl,
           "token_ppl": self.token_ppl, "mean_nll": self.mean_nll, "nll_sum": self.nll_sum, "count": self.count}
    if windows:
      out["windows"] = {"nll": self.window_nll.tolist(), "count": self.window_count.tolist(),
                        "doc": self.window_doc.tolist()}
    return out


def _rope_key(rope: rope_lib.RopeArrays) -> bytes:
  return b"".join(np.ascontiguousarray(np.asarray(a)).tobytes() for a in rope)


def select_documents(documents: Sequence[np.ndarray], length: int, *, bos_id: int | None = None,
                     short_documents: str = "error") -> list[int]:
  """Indices of documents with at least `length` tokens (BOS counted); shorter ones are an error or skipped."""
  if short_documents not in SHORT_DOCUMENT_POLICIES:
    raise EvalError(f"unknown short_documents policy {short_documents!r}; expected "
                    f"{' or '.join(SHORT_DOCUMENT_POLICIES)}")
  if not documents:
    raise EvalError("no documents to evaluate")
  off = int(bos_id is not None)
  sizes = [document_body(np.asarray(d), bos_id).shape[0] + off for d in documents]
  keep = [i for i, n in enumerate(sizes) if n >= length]
  if short_documents == "keep":
    return list(range(len(sizes)))
  if short_documents == "error" and len(keep) < len(sizes):
    i = next(i for i, n in enumerate(sizes) if n < length)
    raise EvalError(f"document {i} has {sizes[i]} tokens, fewer than the evaluation length {length} "
                    f"({len(sizes) - len(keep)} of {len(sizes)} are shorter; filter them with "
                    "short_documents='skip' or a min_tokens filter)")
  if not keep:
    raise EvalError(f"0 of {len(sizes)} documents have >= {length} tokens (longest: {max(sizes)})")
  return keep


def sample_documents(count: int, available: int, *, seed: int) -> list[int]:
  """`count` distinct indices of `available` documents drawn at random (seeded, sorted): the paper's "N random
  samples" (search fitness: 5 PG19 validation books; Books3: 20 books). All of them when count >= available."""
  if count >= available:
    return list(range(available))
  return sorted(int(i) for i in np.random.default_rng(seed).choice(available, size=count, replace=False))


def perplexity(config: model_lib.ModelConfig, params: dict, documents: Sequence[np.ndarray], *, length: int,
               rope: rope_lib.RopeScaling | rope_lib.RopeArrays | None = None, protocol: str = "truncate",
               stride: int | None = None, batch_size: int = 1, bos_id: int | None = None,
               max_length: int | None = None, short_documents: str = "error",
               mesh: jax.sharding.Mesh | None = None,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
  """Perplexity of documents at window length `length` under one RoPE setting.

  Args:
    config, params: the model (params may already be on device).
    documents: i32 token arrays, as lrjax.data.tokenized_documents returns them (BOS first, if any).
    length: window length L in tokens (BOS included).
    rope: a RopeScaling (arrays derived per window length: config.rope_arrays(rope, seq_len=window length)),
      fixed RopeArrays (used for every window), or None for the checkpoint's own config.rope_scaling.
    protocol: "truncate" (one window per document) or "sliding" (with `stride`).
    batch_size: windows per device call (the last batch is padded; one compilation per (batch, L)).
    bos_id: the tokenizer's BOS id, or None. With it, every window is BOS + L-1 document tokens.
    max_length: refuse lengths above this (a guard against accidental huge evaluations).
    short_documents: "error", "skip" or "keep" (as one shorter window) documents with fewer than L tokens.
    mesh: optional device mesh (see compiled_window_nll); batch_size is rounded up to the batch axes' size.
    progress: called with the number of windows finished after each batch.
  Returns:
    PerplexityResult.
  """
  if not isinstance(length, (int, np.integer)) or length < 2:
    raise EvalError(f"length must be an integer >= 2, got {length!r}")
  if max_length is not None and length > max_length:
    raise EvalError(f"length {length} exceeds max_length {max_length} (raise max_length to evaluate it)")
  if batch_size < 1:
    raise EvalError(f"batch_size must be >= 1, got {batch_size}")
  keep = select_documents(documents, length, bos_id=bos_id, short_documents=short_documents)
  docs = [np.asarray(documents[i]) for i in keep]
  for i, d in zip(keep, docs):
    if d.ndim != 1:
      raise EvalError(f"document {i} is not a 1-D token array (shape {d.shape})")
    if d.size and (d.min() < 0 or d.max() >= config.vocab_size):
      raise EvalError(f"document {i} has token ids in [{d.min()}, {d.max()}], outside the model's vocabulary "
                      f"[0, {config.vocab_size}) (tokenizer/model mismatch?)")
  windows = plan_windows([document_body(d, bos_id).shape[0] for d in docs], length, protocol=protocol,
                         stride=stride, bos=bos_id is not None)
  if mesh is not None:
    from lrjax import sharding as sharding_lib
    n_batch = sharding_lib.axis_size(mesh, tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.axis_names))
    batch_size = -(-batch_size // n_batch) * n_batch
    try:
      sharding_lib.validate(mesh, batch=batch_size, length=length, config=config)
    except sharding_lib.ShardingError as e:
      raise EvalError(str(e)) from None
    params = jax.device_put(params, sharding_lib.param_shardings(mesh, params))
  else:
    params = jax.device_put(params)  # once, not at every call (a no-op for arrays already on device)
  fn = compiled_window_nll(config, mesh)

  # Group windows by their RoPE arrays (they differ only where the setting depends on sequence length).
  off = int(bos_id is not None)
  groups: dict[bytes, tuple[rope_lib.RopeArrays, list[int]]] = {}
  cache: dict[int, rope_lib.RopeArrays] = {}
  for i, win in enumerate(windows):
    n = win.end - win.start + off
    if isinstance(rope, rope_lib.RopeArrays):
      arrays = rope
    else:
      if n not in cache:
        cache[n] = config.rope_arrays(rope, seq_len=n)
      arrays = cache[n]
    key = _rope_key(arrays)
    groups.setdefault(key, (arrays, []))[1].append(i)

  nll = np.zeros(len(windows), np.float64)
  count = np.zeros(len(windows), np.float64)
  pending = []

  def collect(item):
    idx, (n_sum, c_sum) = item
    n_sum, c_sum = np.asarray(n_sum, np.float64), np.asarray(c_sum, np.float64)
    nll[idx] = n_sum[:len(idx)]
    count[idx] = c_sum[:len(idx)]
    if progress is not None:
      progress(len(idx))

  for arrays, members in groups.values():
    device_rope = jax.tree.map(jnp.asarray, rope_lib.RopeArrays(*arrays))
    for lo in range(0, len(members), batch_size):
      idx = members[lo:lo + batch_size]
      tokens, weights, _ = window_arrays(docs, [windows[i] for i in idx], length, bos_id)
      pad = batch_size - len(idx)
      if pad:
        tokens = np.concatenate([tokens, np.zeros((pad, length), np.int32)])
        weights = np.concatenate([weights, np.zeros((pad, length - 1), np.float32)])
      if mesh is not None:
        tokens, weights = _shard_batch(mesh, tokens, weights)
      pending.append((idx, fn(params, tokens, device_rope, weights)))
      if len(pending) > 1:  # keep one batch in flight while the host prepares the next
        collect(pending.pop(0))
  for item in pending:
    collect(item)
  if np.any(count <= 0):
    raise EvalError("a window scored no tokens (internal error in window planning)")
  return PerplexityResult(length=int(length), protocol=protocol, stride=stride if protocol == "sliding" else None,
                          num_documents=len(docs), window_nll=nll, window_count=count,
                          window_doc=np.asarray([keep[w.doc] for w in windows], np.int32))


def _shard_batch(mesh, tokens, weights):
  from lrjax import sharding as sharding_lib
  spec = sharding_lib.batch_spec(mesh)
  tok_sharding = jax.sharding.NamedSharding(mesh, spec)
  # Weights are [b, L-1]: the odd length cannot split over the sequence axis; split the batch only.
  w_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0], None))
  return jax.device_put(tokens, tok_sharding), jax.device_put(weights, w_sharding)


def count_windows(documents: Sequence[np.ndarray], length: int, *, protocol: str = "truncate",
                  stride: int | None = None, bos_id: int | None = None, short_documents: str = "error") -> int:
  """How many windows `perplexity` will evaluate (for progress bars)."""
  keep = select_documents(documents, length, bos_id=bos_id, short_documents=short_documents)
  lengths = [document_body(np.asarray(documents[i]), bos_id).shape[0] for i in keep]
  return len(plan_windows(lengths, length, protocol=protocol, stride=stride, bos=bos_id is not None))


# ----------------------------------------------------------------------------------------------------------
# The evaluate experiment: settings x lengths (x sources) -> table, CSV, JSON, plot.

DERIVED_METHODS = {"pi": "linear", "linear": "linear", "ntk": "ntk", "yarn": "yarn", "llama3": "llama3"}
CONFIG_KEYS = {"model", "tokenizer", "dtype", "attention", "block_q", "block_k", "data", "num_documents",
               "sample_documents", "document_seed", "min_tokens", "short_documents", "lengths", "settings",
               "original_length", "protocol", "stride", "batch_size", "max_length", "mesh", "save_windows",
               "progress"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """A table row: `label`, and the RoPE scaling to use at each evaluation length."""
  label: str
  spec: str
  scaling_at: Callable[[int], rope_lib.RopeScaling]


_FILE_OPTIONS = {"target_length", "temperature_from"}


def _split_options(body: str) -> tuple[str, dict]:
  """PATH?key=value&key=value -> (PATH, options); a path that exists as given is never split."""
  if "?" not in body or os.path.exists(body):
    return body, {}
  path, query = body.split("?", 1)
  options = {}
  for item in filter(None, query.split("&")):
    key, sep, value = item.partition("=")
    if not sep or key not in _FILE_OPTIONS:
      raise EvalError(f"factor-file option {item!r}: expected key=value with key in {', '.join(sorted(_FILE_OPTIONS))}")
    options[key] = value
  return path, options


def _factor_file_setting(path: str, options: dict, config: model_lib.ModelConfig) -> rope_lib.RopeScaling:
  target = options.get("target_length")
  if target is not None and (not target.isdigit() or int(target) < 2):
    raise EvalError(f"factor file {path}: target_length must be a positive integer, got {target!r}")
  from lrjax import factors as factors_lib
  try:
    scaling = factors_lib.resolve_file(path, original_length=config.original_length,
                                       target_length=int(target) if target else None,
                                       n_layers=config.num_layers, rotary_dim=config.rotary_dim)
    if "temperature_from" in options:  # the paper's evaluation code: mscale from each evaluated length
      scaling = scaling.replace(temperature_from=options["temperature_from"], attention_factor=None)
  except (ValueError, OSError) as e:
    raise EvalError(f"setting {path}: {e}" + ("" if target else "; append ?target_length=N to the path")) from None
  return scaling


def parse_setting(spec: str, config: model_lib.ModelConfig) -> Setting:
  """A setting string (see configs/evaluate.py): none, model, pi/linear/ntk/yarn/llama3[:S], dynamic[:F],
  or a factor file PATH[?target_length=N&temperature_from=target|length]; any of them as LABEL=SPEC.

  Derived settings use the model's original window L (config.original_length): s = max(1, length / L).
  """
  spec = str(spec).strip()
  label, body = None, spec
  if "=" in spec and not os.path.exists(spec) and not os.path.exists(spec.split("?", 1)[0]):
    label, body = (part.strip() for part in spec.split("=", 1))
    if not label or not body:
      raise EvalError(f"setting {spec!r}: expected LABEL=SPEC")
  original = config.original_length
  name, _, arg = body.partition(":")
  fixed = None
  if arg and name in {**DERIVED_METHODS, "dynamic": 0}:
    try:
      fixed = float(arg)
    except ValueError:
      raise EvalError(f"setting {spec!r}: {arg!r} is not a number") from None
    if not math.isfinite(fixed) or fixed <= 0:
      raise EvalError(f"setting {spec!r}: the factor must be a positive number")
  path, options = _split_options(body)
  if body in ("none", "default"):
    scaling_at = lambda n: rope_lib.RopeScaling()
  elif body == "model":
    scaling_at = lambda n: config.rope_scaling
  elif name in DERIVED_METHODS and (not arg or fixed is not None):
    method = DERIVED_METHODS[name]

    def scaling_at(n, method=method):
      s = fixed if fixed is not None else max(1.0, n / original)
      return rope_lib.RopeScaling(method, factor=s, original_max_position_embeddings=original)
  elif name == "dynamic" and (not arg or fixed is not None):
    scaling = rope_lib.RopeScaling("dynamic", factor=fixed or 1.0, original_max_position_embeddings=original)
    scaling_at = lambda n: scaling
  elif os.path.isfile(path):
    scaling = _factor_file_setting(path, options, config)
    scaling_at = lambda n: scaling
    if label is None:
      parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
      label = f"{parent}/{os.path.basename(path)}" if parent else os.path.basename(path)
  else:
    raise EvalError(f"setting {spec!r}: not a method (none, model, pi, linear, ntk, yarn, llama3, dynamic, "
                    "optionally METHOD:S) nor an existing factor file")
  config.rope_arrays(scaling_at(original))  # validate now (RopeError is a ValueError with a clear message)
  return Setting(label or body, spec, scaling_at)


def validate_config(config) -> None:
  """Unknown keys, bad values: one EvalError naming each problem."""
  keys = set(config.keys())
  problems = []
  if keys - CONFIG_KEYS:
    problems.append(f"unknown config key(s) {', '.join(sorted(keys - CONFIG_KEYS))}")
  if CONFIG_KEYS - keys:
    problems.append(f"missing config key(s) {', '.join(sorted(CONFIG_KEYS - keys))}")
  if problems:
    raise EvalError("; ".join(problems))
  lengths = tuple(config.lengths)
  if not lengths or any(not isinstance(n, int) or n < 2 for n in lengths):
    problems.append(f"lengths must be integers >= 2, got {lengths}")
  elif max(lengths) > config.max_length:
    problems.append(f"length {max(lengths)} exceeds max_length {config.max_length}")
  if not tuple(config.settings):
    problems.append("settings is empty")
  if isinstance(config.data, str) or not tuple(config.data):
    problems.append("data must be a non-empty tuple of sources, e.g. ('builtin:test',)")
  if config.protocol not in PROTOCOLS:
    problems.append(f"unknown protocol {config.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
  if config.short_documents not in SHORT_DOCUMENT_POLICIES:
    problems.append(f"short_documents must be one of {', '.join(SHORT_DOCUMENT_POLICIES)}, got "
                    f"{config.short_documents!r}")
  if config.batch_size < 1 or config.num_documents < 0 or config.min_tokens < -1 or config.original_length < 0:
    problems.append("batch_size >= 1, num_documents >= 0, min_tokens >= -1 and original_length >= 0 required")
  if config.sample_documents and not config.num_documents:
    problems.append("sample_documents needs num_documents (how many to draw)")
  if not config.sample_documents and config.document_seed:
    problems.append("document_seed is set but sample_documents is False")
  if config.protocol == "sliding" and config.stride < 1:
    problems.append("protocol 'sliding' needs stride >= 1 (tokens between window starts)")
  if config.protocol == "truncate" and config.stride:
    problems.append(f"stride is set ({config.stride}) but protocol is 'truncate' (one window per document); "
                    "use protocol='sliding' or stride=0")
  if problems:
    raise EvalError("; ".join(problems))


def load_model(config) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig with the config's execution settings, params) of config.model."""
  from lrjax import weights
  try:
    return weights.load_model(config.model, dtype=config.dtype, attention=config.attention,
                              block_q=config.block_q, block_k=config.block_k)
  except ValueError as e:
    raise EvalError(str(e)) from None


def load_tokenizer_for(config):
  """config.tokenizer, with "auto" = the model directory's tokenizer file (byte for the built-in model)."""
  from lrjax import tokenizers
  spec = config.tokenizer
  if spec == "auto":
    if config.model == "builtin":
      return tokenizers.ByteTokenizer()
    found = tokenizers.find_tokenizer_file(config.model)
    if found is None:
      raise EvalError(f"tokenizer 'auto': no {' or '.join(tokenizers.TOKENIZER_FILES)} in {config.model}; set "
                      "--config.tokenizer=byte or a tokenizer path")
    spec = found
  return tokenizers.load_tokenizer(spec)


def run(config, workdir: str, *, model: tuple[model_lib.ModelConfig, dict] | None = None,
        print_fn: Callable[[str], None] = print) -> dict:
  """Everything experiments/evaluate.py does: perplexity for every (source, setting, length).

  Writes into workdir: results.csv (one row per cell), results.json (config, cells, per-window NLL),
  table.txt and ppl.png (perplexity vs length, log y; one curve per setting [and source]). Files are
  rewritten after every cell, so an interrupted run keeps what it finished.
  Args:
    config: a configs/evaluate.py ConfigDict.
    workdir: output directory.
    model: optional (ModelConfig, params) to use instead of loading config.model (tests, notebooks).
  Returns:
    {"table": {row: {length: ppl}}, "cells": [...], "files": {...}}.
  """
  from lrjax import data as data_lib
  from lrjax import report

  validate_config(config)
  if not workdir:
    raise EvalError("--workdir is required")
  model_config, params = model if model is not None else load_model(config)
  if config.original_length:  # an explicit original window overrides the checkpoint's
    model_config = model_config.replace(original_max_position_embeddings=int(config.original_length))
  tokenizer = load_tokenizer_for(config)
  settings = [parse_setting(s, model_config) for s in config.settings]
  if len({s.label for s in settings}) < len(settings):
    raise EvalError(f"settings have duplicate labels: {[s.label for s in settings]}; use LABEL=SPEC")
  lengths = sorted(set(int(n) for n in config.lengths))
  min_tokens = max(lengths) if config.min_tokens == -1 else int(config.min_tokens)
  sources = [str(s) for s in config.data]
  documents, chosen = {}, {}
  for src in sources:
    docs = data_lib.tokenized_documents(
        src, tokenizer, min_tokens=min_tokens,
        max_documents=None if config.sample_documents else (config.num_documents or None))
    chosen[src] = (sample_documents(config.num_documents, len(docs), seed=config.document_seed)
                   if config.sample_documents and config.num_documents else list(range(len(docs))))
    documents[src] = [docs[i] for i in chosen[src]]
  bos = tokenizer.bos_id
  stride = config.stride if config.protocol == "sliding" else None
  kw = dict(protocol=config.protocol, stride=stride, bos_id=bos, short_documents=config.short_documents)
  total = sum(count_windows(docs, n, **kw) for docs in documents.values() for n in lengths) * len(settings)

  mesh = None
  if jax.device_count() > 1:
    from lrjax import sharding as sharding_lib
    mesh = sharding_lib.make_mesh(config.mesh)
  params = jax.device_put(params) if mesh is None else params
  row_name = (lambda src, s: s.label) if len(sources) == 1 else (lambda src, s: f"{s.label} @ {src}")
  os.makedirs(workdir, exist_ok=True)
  files = {k: os.path.join(workdir, v) for k, v in
           (("csv", "results.csv"), ("json", "results.json"), ("table", "table.txt"), ("plot", "ppl.png"))}
  cells, table = [], {}
  bar = None
  if config.progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="window", desc="perplexity", dynamic_ncols=True)
  try:
    for src in sources:
      for setting in settings:
        row = row_name(src, setting)
        for n in lengths:
          scaling = setting.scaling_at(n)
          if bar is not None:
            bar.set_postfix_str(f"{row} @ {n}")
          start = time.perf_counter()
          result = perplexity(model_config, params, documents[src], length=n, rope=scaling,
                              batch_size=config.batch_size, max_length=config.max_length, mesh=mesh,
                              progress=bar.update if bar is not None else None, **kw)
          cell = {"source": src, "setting": setting.label, "spec": setting.spec, "row": row,
                  "scaling": _scaling_summary(scaling), "seconds": round(time.perf_counter() - start, 3),
                  **result.to_dict(windows=bool(config.save_windows))}
          cells.append(cell)
          table.setdefault(row, {})[n] = result.ppl
          _write_outputs(files, config, model_config, cells, table, lengths, chosen)
  finally:
    if bar is not None:
      bar.close()
  text = report.format_table(list(table), lengths, lambda r, n: table[r].get(n), row_header="setting \\ length")
  print_fn(f"{_title(config, model_config, stride)}; "
           f"{', '.join(f'{len(d)} docs from {s}' for s, d in documents.items())}:\n{text}")
  return {"table": table, "cells": cells, "files": files}


def _title(config, model_config: model_lib.ModelConfig, stride: int | None) -> str:
  return (f"perplexity ({config.protocol}{f', stride {stride}' if stride else ''}); original window "
          f"L = {model_config.original_length}")


def _scaling_summary(scaling: rope_lib.RopeScaling) -> dict:
  out = {"method": scaling.method, "factor": scaling.factor}
  if scaling.original_max_position_embeddings:
    out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
  if scaling.method == "longrope":
    out["n_hat"] = scaling.n_hat
  return out


def _write_outputs(files, config, model_config, cells, table, lengths, chosen) -> None:
  from lrjax import report
  columns = ["source", "setting", "length", "ppl", "token_ppl", "mean_nll", "nll_sum", "count", "num_documents",
             "num_windows", "protocol", "stride", "seconds"]
  report.write_csv(files["csv"], columns, [[c[k] if c[k] is not None else "" for k in columns] for c in cells])
  report.write_json(files["json"], {
      "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
      "model": {"vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
                "num_layers": model_config.num_layers, "max_position_embeddings":
                model_config.max_position_embeddings, "original_length": model_config.original_length,
                "rope_theta": model_config.rope_theta},
      "documents": chosen, "cells": cells})
  stride = config.stride if config.protocol == "sliding" else None
  report.write_text(files["table"], _title(config, model_config, stride) + "\n" + report.format_table(
      list(table), lengths, lambda r, n: table[r].get(n), row_header="setting \\ length") + "\n")
  report.perplexity_plot(files["plot"], table, title=f"perplexity vs length ({config.protocol}, L = "
                         f"{model_config.original_length})")
