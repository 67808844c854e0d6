"""Search fitness: documents -> windows -> population-parallel perplexity through one compiled program.

Fitness is perplexity under the truncate protocol (one window of exactly L tokens per document, built by
lrjax.perplexity's window planner; PPL = exp(mean per-window mean NLL)), or LongRoPE2's needle-driven variant
(perplexity of the answer tokens only). `perplexity.window_nll` is vmapped over a chunk of C candidates' stacked
RopeArrays: factors, n̂ and temperature are traced, so a whole search compiles once per (length, batch, C).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lrjax import perplexity
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib
from lrjax.search.space import SearchError

# LongRoPE2 App. C needle, rendered as plain text (the byte tokenizer takes it verbatim).
NEEDLE_KEY = "numerous-kite"
NEEDLE_INTRO = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the number afterwards.\n"
                "One of the special magic numbers for {key} is: {number}.\n")
NEEDLE_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                   "The special magic number for {key} mentioned in the provided text is")
NEEDLE_ANSWER = " {number}."


def truncate_windows(documents: Sequence[np.ndarray], length: int, bos_id: int | None = None) -> np.ndarray:
  """One window per document, the truncate protocol of lrjax.perplexity: BOS + its first L-1 tokens when bos_id
  is given (a document's own leading BOS is not doubled), else its first L tokens. i32[N, L]."""
  if not documents:
    raise SearchError("no documents to evaluate the fitness on")
  for i, doc in enumerate(documents):
    doc = np.asarray(doc)
    if doc.ndim != 1:
      raise SearchError(f"document {i} is not a 1-D token sequence (shape {doc.shape})")
    if doc.shape[0] < length:
      raise SearchError(f"document {i} has {doc.shape[0]} tokens, shorter than the target length {length}")
  bodies = [perplexity.document_body(np.asarray(d), bos_id).shape[0] for d in documents]
  windows = perplexity.plan_windows(bodies, length, protocol="truncate", bos=bos_id is not None)
  tokens, _, _ = perplexity.window_arrays(documents, windows, length, bos_id)
  return tokens


def needle_windows(documents: Sequence[np.ndarray], length: int, encode: Callable[[str], Sequence[int]], *,
                   bos_id: int | None = None, seed: int = 0, key: str = NEEDLE_KEY
                   ) -> tuple[np.ndarray, np.ndarray]:
  """LongRoPE2 needle-driven windows: [BOS] needle, document filler, question, answer; exactly `length` tokens.

  Each document gets its own 7-digit number (drawn from `seed`). A leading BOS on the documents is kept first.
  Returns (tokens i32[N, length], answer_mask f32[N, length]), the mask 1 at the answer tokens only (the tokens
  whose NLL is the fitness).
  """
  if not documents:
    raise SearchError("no documents to build needle windows from")
  rng = np.random.default_rng(seed)
  tokens, masks = [], []
  for i, doc in enumerate(documents):
    doc = np.asarray(doc, np.int64)
    head = [] if bos_id is None else [bos_id]
    doc = perplexity.document_body(doc, bos_id)
    number = int(rng.integers(1_000_000, 10_000_000))
    intro = list(encode(NEEDLE_INTRO.format(key=key, number=number)))
    question = list(encode(NEEDLE_QUESTION.format(key=key)))
    answer = list(encode(NEEDLE_ANSWER.format(number=number)))
    filler = length - len(head) - len(intro) - len(question) - len(answer)
    if filler < 1:
      raise SearchError(f"target length {length} is too short for the needle prompt ({length - filler} tokens)")
    if doc.shape[0] < filler:
      raise SearchError(f"document {i} has {doc.shape[0] + len(head)} tokens, shorter than the target length "
                        f"{length}")
    tokens.append(np.concatenate([head, intro, doc[:filler], question, answer]).astype(np.int32))
    mask = np.zeros(length, np.float32)
    mask[length - len(answer):] = 1
    masks.append(mask)
  return np.stack(tokens), np.stack(masks)


@dataclasses.dataclass
class CompileCounter:
  """Counts traces of the fitness program (jit traces exactly once per compiled shape)."""
  count: int = 0


@functools.lru_cache(maxsize=32)
def cached_nll_fn(model_config, candidates: int, window_nll: Callable | None = None, mesh=None
                  ) -> tuple[Callable, CompileCounter]:
  """make_nll_fn shared by every search on the same model shape and chunk size (so repeated searches in one
  process, e.g. the demo's stages, compile once); returns (fn, its trace counter)."""
  counter = CompileCounter()
  return make_nll_fn(model_config, candidates=candidates, counter=counter, window_nll=window_nll,
                     mesh=mesh), counter


def fitness_rules(mesh) -> tuple:
  """Logical rules of the fitness program under a mesh: candidates take the data axis, so a sequence's batch
  dim goes over fsdp only (the sequence axis stays the ring's)."""
  return tuple(("batch", "fsdp") if name == "batch" else (name, mesh_axes)
               for name, mesh_axes in sharding_lib.LOGICAL_RULES)


def make_nll_fn(model_config, *, candidates: int, counter: CompileCounter | None = None,
                window_nll: Callable | None = None, mesh=None) -> Callable:
  """A jitted fn(params, tokens i32[b,t], weights f32[b,t-1] | None, rope) -> (nll_sum, count).

  candidates > 1: `rope` is a stacked RopeArrays with leading axis C and outputs are f32[C, b] (jax.vmap over
  candidates; the batch of documents is shared). candidates == 1: one unstacked RopeArrays, outputs f32[b].
  With `mesh`, the program is traced under it: candidates split over its data axis (vmap's spmd axis),
  documents over fsdp, the sequence over the sequence axis (ring attention when the model asks for it),
  parameters by lrjax.sharding's rules.
  """
  window_nll = perplexity.window_nll if window_nll is None else window_nll
  counter = counter if counter is not None else CompileCounter()

  def one(params, tokens, weights, rope):
    return window_nll(model_config, params, tokens, rope, weights=weights)

  spmd = "data" if mesh is not None and "data" in mesh.axis_names and candidates > 1 else None
  many = jax.vmap(one, in_axes=(None, None, None, 0), spmd_axis_name=spmd)

  def fn(params, tokens, weights, rope):
    counter.count += 1  # Python side effect: runs once per trace, i.e. once per compilation
    return (one if candidates == 1 else many)(params, tokens, weights, rope)

  jitted = jax.jit(fn)
  if mesh is None:
    return jitted

  def run(params, tokens, weights, rope):
    with sharding_lib.mesh_context(mesh, fitness_rules(mesh)):
      return jitted(params, tokens, weights, rope)

  def lower(*args):  # the dry run compiles exactly this program
    with sharding_lib.mesh_context(mesh, fitness_rules(mesh)):
      return jitted.lower(*args)

  run.lower = lower
  return run


class PerplexityFitness:
  """Population-parallel perplexity of candidate RopeArrays on fixed windows.

  windows: i32[N, L]; weights: optional f32[N, L] token-aligned weights (the needle answer mask: 1 where the
  token is scored); window_nll gets the target-aligned f32[b, L-1] = weights[:, 1:] (target j is token j+1).
  Candidates go C at a time (the last chunk padded by repeating its first candidate), documents b at a time
  (the last batch padded and masked), so every call has the same shapes: one compilation for the search.
  With `mesh` (see make_nll_fn), the candidates are split over its data axis (C must be a multiple of its
  size), documents over fsdp, each document's tokens over the sequence axis.
  """

  def __init__(self, model_config, params, windows: np.ndarray, weights: np.ndarray | None = None, *,
               candidates_per_call: int = 1, doc_batch: int = 1, mesh=None, window_nll: Callable | None = None):
    windows = np.asarray(windows, np.int32)
    n = windows.shape[0]
    if candidates_per_call < 1 or doc_batch < 1:
      raise SearchError("candidates_per_call and doc_batch must be >= 1")
    self.candidates = int(candidates_per_call)
    self.doc_batch = min(int(doc_batch), n)
    self.num_documents = n
    self._fn, self._counter = cached_nll_fn(model_config, self.candidates, window_nll, mesh)
    self._compiles_before = self._counter.count
    pad = (-n) % self.doc_batch
    self._valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    windows = np.concatenate([windows, np.repeat(windows[:1], pad, 0)])
    if weights is not None:
      weights = np.asarray(weights, np.float32)[:, 1:]
      weights = np.concatenate([weights, np.repeat(weights[:1], pad, 0)])
    self._rope_sharding, put, put_tokens = None, jax.device_put, jax.device_put
    self._params = jax.tree.map(jax.device_put, params)
    if mesh is not None:
      size = mesh.shape.get("data", 1)
      if self.candidates > 1 and self.candidates % size:
        raise SearchError(f"candidates_per_call {self.candidates} is not a multiple of the mesh's data axis "
                          f"({size} devices): candidates are split over it")
      self._rope_sharding = NamedSharding(mesh, P("data" if self.candidates > 1 and "data" in mesh.axis_names
                                                  else None))
      with sharding_lib.mesh_context(mesh, fitness_rules(mesh)):
        self._params = jax.device_put(params, sharding_lib.param_shardings(mesh, params))
      rows = "fsdp" if "fsdp" in mesh.axis_names else None
      seq = sharding_lib.SEQUENCE_AXIS if sharding_lib.SEQUENCE_AXIS in mesh.axis_names else None
      put_tokens = lambda x: jax.device_put(x, NamedSharding(mesh, P(rows, seq)))
      put = lambda x: jax.device_put(x, NamedSharding(mesh, P(rows)))
    b = self.doc_batch
    self._batches = [(put_tokens(windows[i:i + b]), None if weights is None else put(weights[i:i + b]))
                     for i in range(0, windows.shape[0], b)]

  @property
  def compilations(self) -> int:
    """Compilations of the fitness program since this object was made (0 if an earlier search on the same
    shapes already compiled it)."""
    return self._counter.count - self._compiles_before

  def _stack(self, ropes: Sequence[rope_lib.RopeArrays]):
    # jax.device_put, not jnp.asarray: the latter compiles a tiny staging program per shape.
    if self.candidates == 1:
      return jax.tree.map(jax.device_put, ropes[0])
    stacked = rope_lib.stack_rope_arrays(ropes)
    return jax.tree.map(lambda x: jax.device_put(x, self._rope_sharding), stacked)

  def window_mean_nll(self, ropes: Sequence[rope_lib.RopeArrays]) -> np.ndarray:
    """Per-window mean NLL (nats/token), f64[len(ropes), N]."""
    ropes = list(ropes)
    c = self.candidates
    out = np.zeros((len(ropes), self.num_documents))
    for start in range(0, len(ropes), c):
      chunk = ropes[start:start + c]
      real = len(chunk)
      stacked = self._stack(chunk + [chunk[0]] * (c - real))
      sums, counts = [], []
      for tokens, weights in self._batches:
        nll_sum, count = self._fn(self._params, tokens, weights, stacked)
        sums.append(np.asarray(nll_sum, np.float64).reshape(c, -1))
        counts.append(np.asarray(count, np.float64).reshape(c, -1))
      nll_sum = np.concatenate(sums, axis=1)[:, self._valid]
      count = np.concatenate(counts, axis=1)[:, self._valid]
      out[start:start + real] = (nll_sum / count)[:real]
    return out

  def __call__(self, ropes: Sequence[rope_lib.RopeArrays]) -> np.ndarray:
    """Perplexity exp(mean over windows of per-window mean NLL), f64[len(ropes)]; NaN -> inf."""
    ppl = np.exp(self.window_mean_nll(ropes).mean(axis=1))
    return np.where(np.isfinite(ppl), ppl, np.inf)
