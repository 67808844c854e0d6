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
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import loss as loss_lib
from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib

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
  (data, fsdp) and the sequence axis (ring attention when config.attention is "ring[:kernel]"), and tracing happens
  inside the mesh context so activation constraints apply.
  """
  def fn(params, tokens, rope, weights):
    return window_nll(config, params, tokens, rope, weights=weights)

  if mesh is None:
    return jax.jit(fn)
  jitted = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def run(params, tokens, rope, weights):
    with sharding_lib.mesh_context(mesh):
      return jitted(params, tokens, rope, weights)

  def lower(*args):  # the dry run compiles exactly this program
    with sharding_lib.mesh_context(mesh):
      return jitted.lower(*args)

  run.lower = lower
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


def _check_request(config, documents, length, *, batch_size, bos_id, max_length, short_documents):
  """The documents to evaluate (indices, arrays), after checking the request; one EvalError line otherwise."""
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
  return keep, docs


def _place(config, params, mesh, batch_size: int, length: int):
  """(params on device, batch size rounded up to the mesh's batch axes)."""
  if mesh is None:
    return jax.device_put(params), batch_size  # once, not at every call (a no-op for arrays on device)
  n_batch = sharding_lib.axis_size(mesh, tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.axis_names))
  batch_size = -(-batch_size // n_batch) * n_batch
  try:
    sharding_lib.validate(mesh, batch=batch_size, length=length, config=config)
  except sharding_lib.ShardingError as e:
    raise EvalError(str(e)) from None
  return jax.device_put(params, sharding_lib.param_shardings(mesh, params)), batch_size


def _rope_groups(config, rope, windows: Sequence[Window], bos: bool) -> list[tuple[rope_lib.RopeArrays, list]]:
  """Windows grouped by their RoPE arrays (they differ only where the setting depends on sequence length)."""
  groups: dict[bytes, tuple[rope_lib.RopeArrays, list[int]]] = {}
  cache: dict[int, rope_lib.RopeArrays] = {}
  for i, win in enumerate(windows):
    n = win.end - win.start + int(bos)
    if isinstance(rope, rope_lib.RopeArrays):
      arrays = rope
    else:
      if n not in cache:
        cache[n] = config.rope_arrays(rope, seq_len=n)
      arrays = cache[n]
    groups.setdefault(_rope_key(arrays), (arrays, []))[1].append(i)
  return list(groups.values())


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
    bos_id: the BOS id the tokenizer prepends, or None. With it, every window is BOS + L-1 document tokens.
    max_length: refuse lengths above this (a guard against accidental huge evaluations).
    short_documents: "error", "skip" or "keep" (as one shorter window) documents with fewer than L tokens.
    mesh: optional device mesh (see compiled_window_nll); batch_size is rounded up to the batch axes' size.
    progress: called with the number of windows finished after each batch.
  """
  keep, docs = _check_request(config, documents, length, batch_size=batch_size, bos_id=bos_id,
                              max_length=max_length, short_documents=short_documents)
  windows = plan_windows([document_body(d, bos_id).shape[0] for d in docs], length, protocol=protocol,
                         stride=stride, bos=bos_id is not None)
  params, batch_size = _place(config, params, mesh, batch_size, length)
  fn = compiled_window_nll(config, mesh)
  nll, count = np.zeros(len(windows), np.float64), np.zeros(len(windows), np.float64)
  pending = []

  def collect(item):
    idx, (n_sum, c_sum) = item
    nll[idx] = np.asarray(n_sum, np.float64)[:len(idx)]
    count[idx] = np.asarray(c_sum, np.float64)[:len(idx)]
    if progress is not None:
      progress(len(idx))

  for arrays, members in _rope_groups(config, rope, windows, bos_id is not None):
    device_rope = jax.tree.map(jnp.asarray, rope_lib.RopeArrays(*arrays))
    for lo in range(0, len(members), batch_size):
      idx = members[lo:lo + batch_size]
      tokens, weights, _ = window_arrays(docs, [windows[i] for i in idx], length, bos_id)
      pad = batch_size - len(idx)
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
