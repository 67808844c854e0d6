"""LongRoPE evolutionary search for RoPE rescale factors (paper Algorithm 1, plus LongRoPE2 options).

A genome is one int64 vector, host-side numpy, exact and hashable:

  [ticks_0 .. ticks_{g-1}, n_hat_index, temperature_index]

  λ_j      = factor_min + ticks_j · step          (step 0.01; grid anchored at factor_min)
  n̂        = n_hat_choices[n_hat_index]
  mscale   = temperatures[temperature_index]

g = d/2 − first_searched searched pairs. With LongRoPE2's critical dimension cd = first_searched > 0 the pairs
below it follow NTK from λ_cd: λ_i = λ_cd^(i/cd). In the progressive second stage the genome is a multiplier
on fine-tuned factors (λ = λ_ft ⊙ λ_genome). A gene that is not searched has a single choice (index 0).

Genome operators (mutation, crossover) take an explicit np.random.Generator and return only valid genomes:
on the grid, inside [factor_min, factor_max], non-decreasing, indices in range. Fitness is perplexity under
the truncate protocol (one window of exactly L tokens per document; PPL = exp(mean per-window mean NLL)),
computed by `evaluate.window_nll` vmapped over a chunk of C candidates' stacked RopeArrays: factors, n̂ and
temperature are traced, so the whole search compiles once per (length, batch, C) shape.

The search state (population, fitness cache, RNG state, generation, log) is written atomically as JSON after
every generation; resuming reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import report
from lrjax import rope as rope_lib

# The paper's n̂ set (Table 4). The official internal code uses {1,...,32,48,64} instead.
PAPER_N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
SEED_METHODS = ("pi", "ntk", "yarn", "identity", "base")
STAGES = ("long", "second", "short")
FITNESS_KINDS = ("ppl", "needle")
STATE_FILE = "search_state.json"

# LongRoPE2 App. C needle, rendered as plain text (the byte tokenizer takes it verbatim).
NEEDLE_KEY = "numerous-kite"
NEEDLE_INTRO = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the number afterwards.\n"
                "One of the special magic numbers for {key} is: {number}.\n")
NEEDLE_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                   "The special magic number for {key} mentioned in the provided text is")
NEEDLE_ANSWER = " {number}."


class SearchError(ValueError):
  """A search setting, input file or state that cannot be used; the message names the problem."""


# ----------------------------------------------------------------------------------------------------------
# Search space and genomes (host side).


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Where genomes live.

  n_freqs: rotary pairs d/2. factor_min/factor_max: bounds of searched λ (relative ones in the second stage).
  step: grid step. first_searched: LongRoPE2 critical dimension (0 = every pair searched).
  n_hat_choices: allowed n̂ (one value = fixed). temperatures: allowed attention temperatures (one = fixed).
  base_factors: λ_ft for the second stage (f64 [d/2] or [layers, d/2] as nested tuples), None otherwise.
  """

  n_freqs: int
  factor_min: float
  factor_max: float
  step: float = 0.01
  first_searched: int = 0
  n_hat_choices: tuple = (0,)
  temperatures: tuple = (1.0,)
  base_factors: tuple | None = None

  def __post_init__(self):
    if self.step <= 0:
      raise SearchError(f"grid step must be positive, got {self.step}")
    if not 0 < self.factor_min <= self.factor_max:
      raise SearchError(f"factor bounds must satisfy 0 < min <= max, got [{self.factor_min}, {self.factor_max}]")
    if not 0 <= self.first_searched < self.n_freqs:
      raise SearchError(f"critical dimension {self.first_searched} outside 0..{self.n_freqs - 1}")
    if not self.n_hat_choices or not self.temperatures:
      raise SearchError("n_hat_choices and temperatures need at least one value each")
    if any(n < 0 for n in self.n_hat_choices):
      raise SearchError(f"n̂ choices must be >= 0, got {self.n_hat_choices}")
    if self.base_factors is not None and np.shape(self.base_factors)[-1] != self.n_freqs:
      raise SearchError(f"base factors have {np.shape(self.base_factors)[-1]} values per row; the model has "
                        f"{self.n_freqs} rotary frequencies")

  @property
  def n_genes(self) -> int:
    """Searched λ genes."""
    return self.n_freqs - self.first_searched

  @property
  def max_ticks(self) -> int:
    return int(math.floor((self.factor_max - self.factor_min) / self.step + 1e-9))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def genome_key(genome: np.ndarray) -> tuple:
  """Hashable identity of a genome (the fitness-cache key)."""
  return tuple(int(x) for x in genome)


def is_valid(space: SearchSpace, genome: np.ndarray) -> bool:
  """In range, on the grid (integer ticks), non-decreasing, gene indices in range."""
  g = np.asarray(genome)
  if g.shape != (space.n_genes + 2,) or not np.issubdtype(g.dtype, np.integer):
    return False
  ticks = g[:space.n_genes]
  return bool(np.all(ticks >= 0) and np.all(ticks <= space.max_ticks) and np.all(np.diff(ticks) >= 0)
              and 0 <= g[-2] < len(space.n_hat_choices) and 0 <= g[-1] < len(space.temperatures))


def searched_factors(space: SearchSpace, genome: np.ndarray) -> np.ndarray:
  """The searched λ (relative in the second stage), f64[n_genes]."""
  return np.round(space.factor_min + np.asarray(genome[:space.n_genes], np.float64) * space.step, 10)


def genome_factors(space: SearchSpace, genome: np.ndarray) -> np.ndarray:
  """The factors a genome applies: f64[d/2], or [layers, d/2] when the second-stage base is per layer."""
  lam = searched_factors(space, genome)
  cd = space.first_searched
  if cd:
    # LongRoPE2: NTK below the critical dimension, anchored at λ_cd (λ_i = λ_cd^(i/cd), so λ_0 = 1).
    lam = np.concatenate([lam[0] ** (np.arange(cd, dtype=np.float64) / cd), lam])
  if space.base_factors is not None:
    lam = np.asarray(space.base_factors, np.float64) * lam
  return lam


def genome_n_hat(space: SearchSpace, genome: np.ndarray) -> int:
  return int(space.n_hat_choices[int(genome[-2])])


def genome_temperature(space: SearchSpace, genome: np.ndarray) -> float:
  return float(space.temperatures[int(genome[-1])])


def genome_from_factors(space: SearchSpace, factors: np.ndarray, *, n_hat: int = 0,
                        temperature: float | None = None) -> np.ndarray:
  """Nearest valid genome to absolute factors f64[d/2] (snapped to the grid, clipped, made monotone).

  In the second stage `factors` are relative to the base. n̂ and temperature snap to the nearest choice.
  """
  f = np.asarray(factors, np.float64)
  if f.shape != (space.n_freqs,):
    raise SearchError(f"seed factors have shape {f.shape}; expected ({space.n_freqs},)")
  ticks = np.rint((f[space.first_searched:] - space.factor_min) / space.step).astype(np.int64)
  ticks = np.maximum.accumulate(np.clip(ticks, 0, space.max_ticks))
  n_hat_index = int(np.argmin([abs(c - n_hat) for c in space.n_hat_choices]))
  t = space.temperatures[0] if temperature is None else temperature
  temp_index = int(np.argmin([abs(c - t) for c in space.temperatures]))
  return np.concatenate([ticks, [n_hat_index, temp_index]]).astype(np.int64)


def mutate(space: SearchSpace, parent: np.ndarray, prob: float, rng: np.random.Generator,
           is_new: Callable[[np.ndarray], bool] = lambda g: True, max_tries: int = 100) -> np.ndarray | None:
  """A mutant of `parent`, or None if `max_tries` attempts gave nothing new.

  Each searched λ is resampled with probability `prob`, uniformly on the grid between its (already updated)
  left neighbour and its right neighbour (the space bounds at the ends), so the child stays non-decreasing.
  n̂ and temperature genes are resampled uniformly with the same probability.
  """
  n, top = space.n_genes, space.max_ticks
  for _ in range(max_tries):
    child = np.array(parent, np.int64)
    fire = rng.random(n + 2) < prob
    for j in np.flatnonzero(fire[:n]):
      lo = child[j - 1] if j > 0 else 0
      hi = child[j + 1] if j < n - 1 else top
      child[j] = rng.integers(lo, hi + 1)
    if fire[n] and len(space.n_hat_choices) > 1:
      child[n] = rng.integers(len(space.n_hat_choices))
    if fire[n + 1] and len(space.temperatures) > 1:
      child[n + 1] = rng.integers(len(space.temperatures))
    if not np.array_equal(child, parent) and is_new(child):
      assert is_valid(space, child), child
      return child
  return None


def crossover(space: SearchSpace, parent1: np.ndarray, parent2: np.ndarray, prob: float,
              rng: np.random.Generator, is_new: Callable[[np.ndarray], bool] = lambda g: True,
              tries: int = 20) -> np.ndarray | None:
  """A child of parent1 taking each gene from parent2 with probability prob/2, or None.

  A try whose child is not non-decreasing (or not new) is discarded, as in the official code; up to `tries`.
  """
  p1, p2 = np.asarray(parent1, np.int64), np.asarray(parent2, np.int64)
  for _ in range(tries):
    take = (rng.random(p1.shape[0]) < prob) & (rng.random(p1.shape[0]) < 0.5)
    child = np.where(take, p2, p1)
    if (np.all(np.diff(child[:space.n_genes]) >= 0) and not np.array_equal(child, p1)
        and is_new(child)):
      assert is_valid(space, child), child
      return child
  return None


def critical_dimension(rotary_dim: int, theta: float, original_length: int) -> int:
  """LongRoPE2 theoretical critical pair index ceil((d/2)·log_θ(L_train/2π)), clamped to [0, d/2 − 1]."""
  cd = math.ceil((rotary_dim / 2) * math.log(original_length / (2 * math.pi)) / math.log(theta))
  return min(max(cd, 0), rotary_dim // 2 - 1)


def method_factors(method: str, scale: float, *, rotary_dim: int, theta: float, original_length: int,
                   beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
  """λ_i = default_inv_freq_i / method_inv_freq_i of PI ("pi"), NTK ("ntk"), YaRN ("yarn"); f64[d/2].

  "identity" is all ones. Uses lrjax.rope, i.e. transformers' float32 formulas.
  """
  if method == "identity" or scale == 1.0:
    return np.ones(rotary_dim // 2)
  name = {"pi": "linear", "ntk": "ntk", "yarn": "yarn"}[method]
  scaling = rope_lib.RopeScaling(method=name, factor=float(scale), original_max_position_embeddings=original_length,
                                 beta_fast=beta_fast, beta_slow=beta_slow)
  inv, _ = rope_lib.inv_freq_and_attention_factor(scaling, dim=rotary_dim, theta=theta)
  return rope_lib.default_inv_freq(rotary_dim, theta).astype(np.float64) / inv.astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Evolution loop with resumable state.


@dataclasses.dataclass(frozen=True)
class Evolution:
  """Algorithm 1 settings: P (population), N1 (mutations), N2 (crossovers), k (parents), p, T (iterations)."""

  population: int = 64
  mutations: int = 16
  crossovers: int = 16
  parents: int = 32
  mutation_prob: float = 0.3
  iterations: int = 40
  crossover_tries: int = 20
  max_tries: int = 100
  early_stop_patience: int = 0
  early_stop_tol: float = 1e-3

  def __post_init__(self):
    if self.parents < 1 or self.population < self.parents:
      raise SearchError(f"population {self.population} is smaller than the {self.parents} parents it must keep")
    if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers < 1:
      raise SearchError(f"need at least one mutation or crossover per iteration, got {self.mutations} and "
                        f"{self.crossovers}")
    if not 0 < self.mutation_prob <= 1:
      raise SearchError(f"mutation probability must be in (0, 1], got {self.mutation_prob}")
    if self.iterations < 0 or self.early_stop_patience < 0:
      raise SearchError("iterations and early_stop_patience must be >= 0")


@dataclasses.dataclass
class EvolutionResult:
  best: np.ndarray
  best_fitness: float
  seed_fitness: dict          # seed name -> fitness
  population: list            # final population, best first: [(genome, fitness)]
  log: list                   # per-generation rows (dicts)
  evaluations: int            # distinct genomes evaluated
  generations: int            # generations run (generation 0 = the initial population)
  stopped_early: bool


def _fit(value) -> float:
  """Fitness as stored: non-finite (diverged) becomes +inf so it sorts last."""
  value = float(value)
  return value if math.isfinite(value) else math.inf


def _json_fit(value: float):
  return value if math.isfinite(value) else None


def _rank(population: list[np.ndarray], cache: dict) -> list[np.ndarray]:
  """Best first; ties broken by the genome itself so the order never depends on insertion order."""
  return sorted(population, key=lambda g: (cache[genome_key(g)], genome_key(g)))


LOG_FIELDS = ("generation", "best_fitness", "mean_fitness", "evaluations", "total_evaluations", "seconds")


def write_log_csv(path: str, rows: Sequence[Mapping]) -> None:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=LOG_FIELDS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: row[k] for k in LOG_FIELDS})
  report.atomic_write(path, out.getvalue())


def evolve(space: SearchSpace, evolution: Evolution, seeds: Mapping[str, np.ndarray],
           fitness_fn: Callable[[list[np.ndarray]], np.ndarray], *, rng: np.random.Generator,
           state_path: str | None = None, fingerprint: str = "", resume: bool = False,
           progress: bool = False, log_csv: str | None = None) -> EvolutionResult:
  """Algorithm 1. `fitness_fn` maps a list of genomes to f64 fitness (lower is better).

  Generation 0 evaluates the seeds and P − (#seeds) mutants of them (taken from the seeds in turn). Then,
  each of `iterations` generations: the top-k are kept as parents, N1 mutants of random parents and N2
  crossovers of two distinct random parents (a failed crossover mutates its first parent) join them, and only
  genomes never evaluated before are sent to `fitness_fn`.

  With `state_path`, the state is written atomically after each generation; `resume=True` continues from it
  (a finished search returns at once; one resumed with more `iterations` runs the extra generations). RNG,
  population, cache and log are all in the state, so a resumed search ends exactly where an uninterrupted one
  would.
  """
  seeds = {name: np.asarray(g, np.int64) for name, g in seeds.items()}
  for name, g in seeds.items():
    if not is_valid(space, g):
      raise SearchError(f"seed {name!r} is not a valid genome for this search space")
  cache: dict[tuple, float] = {}
  state = None
  if resume and state_path and os.path.exists(state_path):
    state = load_state(state_path, fingerprint)
  if state is not None:
    rng.bit_generator.state = state["rng"]
    cache = {tuple(g): (math.inf if f is None else f) for g, f in state["cache"]}
    population = [np.asarray(g, np.int64) for g in state["population"]]
    generation, log, stale = state["generation"], state["log"], state["stale"]
    stopped = state["stopped_early"]
  else:
    population, generation, log, stale, stopped = [], -1, [], 0, False

  def save():
    if state_path:
      payload = {
          "version": 1, "fingerprint": fingerprint, "generation": generation, "stale": stale,
          "stopped_early": stopped, "done": stopped or generation >= evolution.iterations,
          "rng": rng.bit_generator.state, "population": [genome_key(g) for g in population],
          "cache": [[list(k), _json_fit(f)] for k, f in cache.items()], "log": log,
          "seeds": {name: genome_key(g) for name, g in seeds.items()},
      }
      report.atomic_write(state_path, json.dumps(payload))
    if log_csv:
      write_log_csv(log_csv, log)

  def evaluate(genomes: list[np.ndarray]) -> int:
    new, seen = [], set()
    for g in genomes:
      k = genome_key(g)
      if k not in cache and k not in seen:
        if not is_valid(space, g):
          raise AssertionError(f"refusing to evaluate an invalid genome {k}")
        new.append(g)
        seen.add(k)
    if new:
      values = np.asarray(fitness_fn(new), np.float64)
      for g, v in zip(new, values):
        cache[genome_key(g)] = _fit(v)
    return len(new)

  def record(seconds: float, evaluated: int):
    fits = np.array([cache[genome_key(g)] for g in population])
    finite = fits[np.isfinite(fits)]
    log.append({"generation": generation, "best_fitness": float(fits[0]),
                "mean_fitness": float(finite.mean()) if finite.size else math.inf,
                "evaluations": evaluated, "total_evaluations": len(cache), "seconds": round(seconds, 3)})

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=evolution.iterations + 1, initial=generation + 1, desc="search", unit="gen")
  try:
    if generation < 0:  # generation 0: seeds + mutants
      start = time.perf_counter()
      pending: dict[tuple, np.ndarray] = {}
      for g in seeds.values():
        pending.setdefault(genome_key(g), g)
      seed_list = list(pending.values())
      is_new = lambda g: genome_key(g) not in pending
      for i in range(max(evolution.population - len(seed_list), 0)):
        child = mutate(space, seed_list[i % len(seed_list)], evolution.mutation_prob, rng, is_new,
                       evolution.max_tries)
        if child is not None:
          pending[genome_key(child)] = child
      population = list(pending.values())
      evaluated = evaluate(population)
      generation = 0
      population = _rank(population, cache)
      record(time.perf_counter() - start, evaluated)
      save()
      if bar is not None:
        bar.update(1)
        bar.set_postfix(best=f"{log[-1]['best_fitness']:.4g}", evals=len(cache))
    while not stopped and generation < evolution.iterations:
      start = time.perf_counter()
      parents = population[:evolution.parents]
      taken = {genome_key(g) for g in parents}
      is_new = lambda g: genome_key(g) not in cache and genome_key(g) not in taken
      children = []

      def add(child):
        if child is not None:
          taken.add(genome_key(child))
          children.append(child)

      for _ in range(evolution.mutations):
        parent = parents[int(rng.integers(len(parents)))]
        add(mutate(space, parent, evolution.mutation_prob, rng, is_new, evolution.max_tries))
      for _ in range(evolution.crossovers):
        if len(parents) < 2:
          add(mutate(space, parents[0], evolution.mutation_prob, rng, is_new, evolution.max_tries))
          continue
        i, j = sorted(int(x) for x in rng.choice(len(parents), 2, replace=False))
        child = crossover(space, parents[i], parents[j], evolution.mutation_prob, rng, is_new,
                          evolution.crossover_tries)
        if child is None:
          child = mutate(space, parents[i], evolution.mutation_prob, rng, is_new, evolution.max_tries)
        add(child)
      evaluated = evaluate(children)
      previous_best = cache[genome_key(population[0])]
      generation += 1
      population = _rank(parents + children, cache)
      improved = previous_best - cache[genome_key(population[0])] > evolution.early_stop_tol
      stale = 0 if improved else stale + 1
      if evolution.early_stop_patience and stale >= evolution.early_stop_patience:
        stopped = generation < evolution.iterations
      record(time.perf_counter() - start, evaluated)
      save()
      if bar is not None:
        bar.update(1)
        bar.set_postfix(best=f"{log[-1]['best_fitness']:.4g}", evals=len(cache))
    stopped_early = stopped
    save()
  finally:
    if bar is not None:
      bar.close()
  best = population[0]
  return EvolutionResult(
      best=best, best_fitness=cache[genome_key(best)],
      seed_fitness={name: cache[genome_key(g)] for name, g in seeds.items()},
      population=[(g, cache[genome_key(g)]) for g in population], log=log, evaluations=len(cache),
      generations=generation + 1, stopped_early=stopped_early)


def load_state(path: str, fingerprint: str) -> dict:
  """The saved search state; refuses a state written by a different search."""
  try:
    with open(path) as f:
      state = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SearchError(f"cannot read search state {path}: {e}") from None
  if state.get("version") != 1:
    raise SearchError(f"search state {path} has unknown version {state.get('version')!r}")
  if state.get("fingerprint") != fingerprint:
    raise SearchError(f"search state {path} was written by a different search (settings, model shape or "
                      "documents differ); use a fresh workdir or set resume=False")
  return state


def fingerprint_of(*parts: Any) -> str:
  """Stable digest of JSON-able parts (settings, space, seeds) and raw arrays (document tokens)."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.dtype.str, p.shape)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Fitness: documents -> windows -> population-parallel perplexity.


def truncate_windows(documents: Sequence[np.ndarray], length: int) -> np.ndarray:
  """One window per document: its first `length` tokens (the truncate protocol). i32[N, length]."""
  if not documents:
    raise SearchError("no documents to evaluate the fitness on")
  rows = []
  for i, doc in enumerate(documents):
    doc = np.asarray(doc)
    if doc.ndim != 1:
      raise SearchError(f"document {i} is not a 1-D token sequence (shape {doc.shape})")
    if doc.shape[0] < length:
      raise SearchError(f"document {i} has {doc.shape[0]} tokens, shorter than the target length {length}")
    rows.append(doc[:length].astype(np.int32))
  return np.stack(rows)


def needle_windows(documents: Sequence[np.ndarray], length: int, encode: Callable[[str], Sequence[int]], *,
                   bos_id: int | None = None, seed: int = 0, key: str = NEEDLE_KEY
                   ) -> tuple[np.ndarray, np.ndarray]:
  """LongRoPE2 needle-driven windows: [BOS] needle, document filler, question, answer; exactly `length` tokens.

  Each document gets its own 7-digit number (drawn from `seed`). A leading BOS on the documents (as
  lrjax.data adds when the tokenizer has one) is kept first. Returns (tokens i32[N, length],
  answer_mask f32[N, length]), the mask 1 at the answer tokens only (the tokens whose NLL is the fitness).
  """
  if not documents:
    raise SearchError("no documents to build needle windows from")
  rng = np.random.default_rng(seed)
  tokens, masks = [], []
  for i, doc in enumerate(documents):
    doc = np.asarray(doc, np.int64)
    head = []
    if bos_id is not None:
      head = [bos_id]
      doc = doc[1:] if doc.shape[0] and doc[0] == bos_id else doc
    number = int(rng.integers(1_000_000, 10_000_000))
    intro = list(encode(NEEDLE_INTRO.format(key=key, number=number)))
    question = list(encode(NEEDLE_QUESTION.format(key=key)))
    answer = list(encode(NEEDLE_ANSWER.format(number=number)))
    filler = length - len(head) - len(intro) - len(question) - len(answer)
    if filler < 1:
      raise SearchError(f"target length {length} is too short for the needle prompt "
                        f"({length - filler} tokens)")
    if doc.shape[0] < filler:
      raise SearchError(f"document {i} has {doc.shape[0] + len(head)} tokens, shorter than the target length "
                        f"{length}")
    row = np.concatenate([head, intro, doc[:filler], question, answer]).astype(np.int32)
    mask = np.zeros(length, np.float32)
    mask[length - len(answer):] = 1
    tokens.append(row)
    masks.append(mask)
  return np.stack(tokens), np.stack(masks)


@dataclasses.dataclass
class CompileCounter:
  """Counts traces of the fitness program (jit traces exactly once per compiled shape)."""
  count: int = 0


@functools.lru_cache(maxsize=32)
def cached_nll_fn(model_config, candidates: int, window_nll: Callable | None = None, mesh=None,
                  axis: str = "data") -> tuple[Callable, CompileCounter]:
  """make_nll_fn shared by every search on the same model shape and chunk size (so repeated searches in one
  process, e.g. the demo's stages, compile once); returns (fn, its trace counter)."""
  counter = CompileCounter()
  return make_nll_fn(model_config, candidates=candidates, counter=counter, window_nll=window_nll, mesh=mesh,
                     axis=axis), counter


def make_nll_fn(model_config, *, candidates: int, counter: CompileCounter | None = None,
                window_nll: Callable | None = None, mesh=None, axis: str = "data") -> Callable:
  """A jitted fn(params, tokens i32[b,t], weights f32[b,t-1] | None, rope) -> (nll_sum, count).

  candidates > 1: `rope` is a stacked RopeArrays with leading axis C and outputs are f32[C, b] (jax.vmap over
  candidates; the batch of documents is shared). candidates == 1: one unstacked RopeArrays, outputs f32[b].
  With `mesh`, the C axis is split over mesh axis `axis` (jax.shard_map: each device vmaps over its share,
  params and tokens replicated).
  """
  if window_nll is None:
    from lrjax import evaluate
    window_nll = evaluate.window_nll
  counter = counter if counter is not None else CompileCounter()

  def one(params, tokens, weights, rope):
    return window_nll(model_config, params, tokens, rope, weights=weights)

  def many(params, tokens, weights, rope):
    return jax.vmap(one, in_axes=(None, None, None, 0))(params, tokens, weights, rope)

  if candidates > 1 and mesh is not None:
    from jax.sharding import PartitionSpec as P
    # check_vma=False: the blockwise attention's lax.cond mixes device-varying and invariant carries, which the
    # varying-manual-axes checker rejects although every candidate's computation is purely local.
    many = jax.shard_map(many, mesh=mesh, in_specs=(P(), P(), P(), P(axis)), out_specs=P(axis),
                         check_vma=False)

  def fn(params, tokens, weights, rope):
    counter.count += 1  # Python side effect: runs once per trace, i.e. once per compilation
    return (one if candidates == 1 else many)(params, tokens, weights, rope)

  return jax.jit(fn)


class PerplexityFitness:
  """Population-parallel perplexity of candidate RopeArrays on fixed windows.

  windows: i32[N, L]; weights: optional f32[N, L] token-aligned weights (the needle answer mask: 1 where the
  token is scored); window_nll gets the target-aligned f32[b, L-1] = weights[:, 1:] (target j is token j+1).
  Candidates go C at a time (the last chunk padded by repeating its first candidate), documents b at a time
  (the last batch padded and masked), so every call has the same shapes: one compilation for the search.
  With `mesh`, the candidate axis is sharded over mesh axis `axis` (C must be a multiple of its size).
  """

  def __init__(self, model_config, params, windows: np.ndarray, weights: np.ndarray | None = None, *,
               candidates_per_call: int = 1, doc_batch: int = 1, mesh=None, axis: str = "data",
               window_nll: Callable | None = None):
    windows = np.asarray(windows, np.int32)
    n, length = windows.shape
    if candidates_per_call < 1 or doc_batch < 1:
      raise SearchError("candidates_per_call and doc_batch must be >= 1")
    self.candidates = int(candidates_per_call)
    self.doc_batch = min(int(doc_batch), n)
    self.num_documents = n
    self._fn, self._counter = cached_nll_fn(model_config, self.candidates, window_nll, mesh, axis)
    self._compiles_before = self._counter.count
    self.model_config = model_config
    pad = (-n) % self.doc_batch
    self._valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    windows = np.concatenate([windows, np.repeat(windows[:1], pad, 0)])
    if weights is not None:
      weights = np.asarray(weights, np.float32)[:, 1:]
      weights = np.concatenate([weights, np.repeat(weights[:1], pad, 0)])
    self._rope_sharding = None
    replicated = None
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec
      size = mesh.shape[axis]
      if self.candidates % size:
        raise SearchError(f"candidates_per_call {self.candidates} is not a multiple of the {size} devices "
                          f"on mesh axis {axis!r}")
      self._rope_sharding = NamedSharding(mesh, PartitionSpec(axis))
      replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.device_put(x, replicated)
    self._params = jax.tree.map(put, params)
    b = self.doc_batch
    self._batches = [(put(windows[i:i + b]), None if weights is None else put(weights[i:i + b]))
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
      chunk = chunk + [chunk[0]] * (c - real)
      stacked = self._stack(chunk)
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


# ----------------------------------------------------------------------------------------------------------
# From configs to a search: space, seeds, scaling.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a search on one target length needs besides the model weights and documents."""

  space: SearchSpace
  evolution: Evolution
  seeds: dict                       # name -> genome
  seed_factors: dict                # name -> absolute f64[d/2] factors of the (unsnapped) method
  target_length: int
  original_length: int
  scale: float                      # s of this search (relative to base_length in the second stage)
  temperature_policy: Any           # "su" | "yarn" | float
  temperature_length: int           # the length whose scale (vs original_length) sets the temperature
  rotary_dim: int
  theta: float
  n_layers: int
  stage: str = "long"
  base_length: int = 0

  def scaling(self, genome: np.ndarray, *, short_factor=None, buckets=()) -> rope_lib.RopeScaling:
    """The RopeScaling (method longrope) a genome stands for; n̂ and the temperature made explicit."""
    return rope_lib.RopeScaling(
        method="longrope", factor=self.target_length / self.original_length,
        original_max_position_embeddings=self.original_length,
        long_factor=genome_factors(self.space, genome), short_factor=short_factor, buckets=buckets,
        n_hat=genome_n_hat(self.space, genome), attention_factor=genome_temperature(self.space, genome))

  def rope_arrays(self, genome: np.ndarray) -> rope_lib.RopeArrays:
    return rope_lib.rope_arrays(self.scaling(genome), dim=self.rotary_dim, theta=self.theta,
                                n_layers=self.n_layers, max_position_embeddings=self.target_length)


def policy_temperature(policy, original_length: int, length: int) -> float:
  """The attention temperature (cos/sin magnitude) of `policy` at `length`, measured against the original."""
  scaling = rope_lib.RopeScaling(method="longrope", factor=length / original_length,
                                 original_max_position_embeddings=original_length, long_factor=(1.0,),
                                 temperature=policy)
  return rope_lib.longrope_attention_factor(scaling, None)


def _temperature_policy(value):
  if isinstance(value, str):
    if value in rope_lib.TEMPERATURES:
      return value
    try:
      return float(value)
    except ValueError:
      raise SearchError(f"unknown temperature policy {value!r}; expected 'su', 'yarn' or a number") from None
  return float(value)


def make_plan(search_config, model_config, *, target_length: int, stage: str = "long",
              base_factors: np.ndarray | None = None, base_length: int = 0) -> Plan:
  """Search space, Algorithm-1 settings and seeds for one target length.

  Args:
    search_config: the `search` ConfigDict of configs/search.py.
    model_config: lrjax.model.ModelConfig of the model searched on.
    target_length: L' of this search.
    stage: "long" (absolute λ), "second" (λ is a multiplier on `base_factors`, s = L'/base_length) or
      "short" (absolute λ at or near the original window, seeded also with `base_factors`).
    base_factors: fine-tuned factors, f64[d/2] or [layers, d/2] (second and short stages).
    base_length: the length base_factors were made for (second: the fine-tuning length).
  """
  sc = search_config
  d, theta, n_layers = model_config.rotary_dim, float(model_config.rope_theta), model_config.num_layers
  original = int(sc.original_length or model_config.max_position_embeddings)
  if stage not in STAGES:
    raise SearchError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
  if target_length < original:
    raise SearchError(f"target length {target_length} is shorter than the model's original window {original}")
  if stage == "long" and target_length == original:
    raise SearchError(f"target length {target_length} equals the original window; a long search needs s > 1 "
                      "(use stage 'short' to search at the window)")
  if base_factors is not None:
    base_factors = np.asarray(base_factors, np.float64)
    if base_factors.shape[-1] != d // 2:
      raise SearchError(f"base factors have {base_factors.shape[-1]} values per row; the model has "
                        f"{d // 2} rotary frequencies")
    if base_factors.ndim == 2 and base_factors.shape[0] != n_layers:
      raise SearchError(f"base factors have {base_factors.shape[0]} rows; the model has {n_layers} layers")
  if stage == "second":
    if base_factors is None or not base_length:
      raise SearchError("the second stage needs base_factors (the fine-tuned factors) and base_length")
    if target_length <= base_length:
      raise SearchError(f"second-stage target {target_length} must exceed the fine-tuning length {base_length}")
    scale, seed_original = target_length / base_length, base_length
  else:
    scale, seed_original = target_length / original, original
  lo = sc.min_factor_scale * scale + sc.min_factor_offset
  hi = sc.max_factor_scale * scale + sc.max_factor_offset
  first = critical_dimension(d, theta, original) if sc.critical_dim else 0
  policy = _temperature_policy(sc.temperature)
  temperature_length = int(sc.temperature_length or target_length)
  fixed_temperature = policy_temperature(policy, original, temperature_length)
  if sc.search_temperature:
    t_lo, t_hi = (float(x) for x in sc.temperature_range)
    if not 0 < t_lo <= t_hi:
      raise SearchError(f"temperature_range must satisfy 0 < lo <= hi, got {sc.temperature_range}")
    n_t = int(math.floor((t_hi - t_lo) / sc.temperature_step + 1e-9)) + 1
    temperatures = tuple(round(t_lo + i * sc.temperature_step, 10) for i in range(n_t))
  else:
    temperatures = (fixed_temperature,)
  n_hat_choices = tuple(int(n) for n in sc.n_hat_choices) if sc.search_n_hat else (int(sc.n_hat),)
  space = SearchSpace(
      n_freqs=d // 2, factor_min=float(lo), factor_max=float(hi), step=float(sc.step), first_searched=first,
      n_hat_choices=n_hat_choices, temperatures=temperatures,
      base_factors=None if stage != "second" else rope_lib._freeze(base_factors))
  evolution = Evolution(
      population=sc.population, mutations=sc.mutations, crossovers=sc.crossovers, parents=sc.parents,
      mutation_prob=sc.mutation_prob, iterations=sc.iterations, crossover_tries=sc.crossover_tries,
      max_tries=sc.max_tries, early_stop_patience=sc.early_stop_patience, early_stop_tol=sc.early_stop_tol)
  seeds, seed_factors = {}, {}
  start_n_hat = int(sc.n_hat) if not sc.search_n_hat else 0
  for name in sc.seeds:
    if name not in SEED_METHODS:
      raise SearchError(f"unknown seed {name!r}; expected one of {', '.join(SEED_METHODS)}")
    if name == "base":
      if base_factors is None:
        raise SearchError("seed 'base' needs base_factors")
      rel = base_factors if base_factors.ndim == 1 else base_factors.mean(axis=0)
      if stage == "second":
        rel = np.ones(d // 2)
      absolute = base_factors
    else:
      rel = method_factors(name, scale, rotary_dim=d, theta=theta, original_length=seed_original,
                           beta_fast=sc.yarn_beta_fast, beta_slow=sc.yarn_beta_slow)
      absolute = rel if stage != "second" else base_factors * rel
    seeds[name] = genome_from_factors(space, rel, n_hat=start_n_hat, temperature=fixed_temperature)
    seed_factors[name] = np.asarray(absolute, np.float64)
  for i, path in enumerate(sc.init_factors):
    from lrjax import factors as factors_lib
    try:
      loaded = factors_lib.load(path, n_layers=n_layers, rotary_dim=d)
    except ValueError as e:
      raise SearchError(f"init_factors {path}: {e}") from None
    f = np.asarray(loaded.long_factor, np.float64)
    f = f if f.ndim == 1 else f.mean(axis=0)
    rel = f / (base_factors if stage == "second" else 1.0)
    rel = rel if rel.ndim == 1 else rel.mean(axis=0)
    name = f"file{i}:{os.path.basename(path)}"
    seeds[name] = genome_from_factors(space, rel, n_hat=loaded.n_hat if sc.search_n_hat else start_n_hat,
                                      temperature=fixed_temperature)
    seed_factors[name] = np.asarray(loaded.long_factor, np.float64)
  if not seeds:
    raise SearchError("no seeds: set search.seeds and/or search.init_factors")
  return Plan(space=space, evolution=evolution, seeds=seeds, seed_factors=seed_factors,
              target_length=int(target_length), original_length=original, scale=float(scale),
              temperature_policy=policy, temperature_length=temperature_length, rotary_dim=d, theta=theta,
              n_layers=n_layers, stage=stage, base_length=int(base_length))


# ----------------------------------------------------------------------------------------------------------
# Config schema (configs/search.py): every key is read somewhere; unknown or stage-irrelevant ones are errors.

CONFIG_KEYS = {
    "stage": None, "model": None, "dtype": None, "attention": None, "block_q": None, "block_k": None,
    "resume": None, "progress": None, "base_factors": None, "base_length": None, "short_lengths": None,
    "dry_run": None, "layout": None,
    "data": ("source", "tokenizer", "num_documents", "fitness", "needle_seed"),
    "search": ("target_length", "original_length", "population", "mutations", "crossovers", "parents",
               "mutation_prob", "iterations", "crossover_tries", "max_tries", "early_stop_patience",
               "early_stop_tol", "step", "min_factor_scale", "min_factor_offset", "max_factor_scale",
               "max_factor_offset", "search_n_hat", "n_hat", "n_hat_choices", "temperature",
               "temperature_length", "search_temperature", "temperature_range", "temperature_step", "seeds",
               "yarn_beta_fast", "yarn_beta_slow", "init_factors", "critical_dim", "seed",
               "candidates_per_call", "doc_batch", "shard_candidates"),
}


def validate_config(config) -> None:
  """Raises SearchError naming the first unknown, missing or unused (for this stage) config value."""
  present = set(config.keys())
  expected = set(CONFIG_KEYS)
  if present - expected:
    raise SearchError(f"unknown config keys: {sorted(present - expected)}")
  if expected - present:
    raise SearchError(f"missing config keys: {sorted(expected - present)}")
  for section, keys in CONFIG_KEYS.items():
    if keys is None:
      continue
    got = set(config[section].keys())
    if got - set(keys):
      raise SearchError(f"unknown config keys in {section}: {sorted(got - set(keys))}")
    if set(keys) - got:
      raise SearchError(f"missing config keys in {section}: {sorted(set(keys) - got)}")
  stage, sc = config.stage, config.search
  if stage not in STAGES:
    raise SearchError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
  if config.data.fitness not in FITNESS_KINDS:
    raise SearchError(f"unknown fitness {config.data.fitness!r}; expected one of {', '.join(FITNESS_KINDS)}")
  if config.data.fitness != "needle" and config.data.needle_seed:
    raise SearchError("data.needle_seed is set but data.fitness is not 'needle'")
  if stage == "long" and (config.base_factors or config.base_length):
    raise SearchError("base_factors/base_length are only used by the 'second' and 'short' stages")
  if stage in ("second", "short") and not (config.base_factors and config.base_length):
    raise SearchError(f"stage {stage!r} needs base_factors (a factor file) and base_length")
  if stage == "short":
    if sc.target_length:
      raise SearchError("stage 'short' searches at short_lengths; leave search.target_length at 0")
    if not config.short_lengths:
      raise SearchError("stage 'short' needs short_lengths")
  else:
    if config.short_lengths:
      raise SearchError("short_lengths is only used by stage 'short'")
    if not sc.target_length:
      raise SearchError("search.target_length must be set")
  if not sc.search_n_hat and tuple(sc.n_hat_choices) != PAPER_N_HAT_CHOICES:
    raise SearchError("search.n_hat_choices is set but search.search_n_hat is False")
  if sc.search_n_hat and sc.n_hat:
    raise SearchError("search.n_hat (a fixed n̂) is set but search.search_n_hat is True")
  if not sc.search_temperature and (tuple(sc.temperature_range) != (1.0, 1.5) or sc.temperature_step != 0.01):
    raise SearchError("search.temperature_range/temperature_step are set but search.search_temperature is False")
  if "yarn" not in sc.seeds and (sc.yarn_beta_fast, sc.yarn_beta_slow) != (32.0, 1.0):
    raise SearchError("search.yarn_beta_fast/yarn_beta_slow are set but 'yarn' is not among search.seeds")
  if "base" in sc.seeds and stage == "long":
    raise SearchError("seed 'base' needs base_factors, which stage 'long' does not use")
  if sc.doc_batch < 1 or sc.candidates_per_call < 1 or config.data.num_documents < 1:
    raise SearchError("search.doc_batch, search.candidates_per_call and data.num_documents must be >= 1")
  Evolution(population=sc.population, mutations=sc.mutations, crossovers=sc.crossovers, parents=sc.parents,
            mutation_prob=sc.mutation_prob, iterations=sc.iterations,
            early_stop_patience=sc.early_stop_patience)


# ----------------------------------------------------------------------------------------------------------
# Running a search and writing its outputs.


@dataclasses.dataclass
class SearchResult:
  """A finished search: the best setting, its fitness, the seeds' fitness, and where the outputs are."""

  plan: Plan
  scaling: rope_lib.RopeScaling
  fitness: float
  seed_fitness: dict
  evolution: EvolutionResult
  compilations: int
  seconds: float
  workdir: str
  num_documents: int


def run(config, model_config, params, documents: Sequence[np.ndarray], workdir: str, *,
        base_factors: np.ndarray | None = None, target_length: int | None = None, stage: str | None = None,
        tokenizer=None, mesh=None, window_nll: Callable | None = None) -> SearchResult:
  """One evolutionary search; writes factors, HF snippet, log, plots and state into `workdir`.

  Args:
    config: a configs/search.py ConfigDict (validated here).
    model_config, params: the model searched on (execution settings such as attention/dtype as given).
    documents: token sequences (1-D int arrays), each at least the target length.
    workdir: output directory; holds the resumable state.
    base_factors: fine-tuned factors for the second/short stage (f64 [d/2] or [layers, d/2]).
    target_length, stage: override config.search.target_length / config.stage (run_short uses these).
    tokenizer: lrjax.tokenizers tokenizer (encode, bos_id); needed by the needle fitness.
    mesh: optional jax Mesh with a "data" axis to shard candidates over.
  Returns:
    SearchResult.
  """
  validate_config(config)
  stage = stage or config.stage
  target = int(target_length or config.search.target_length)
  sc = config.search
  plan = make_plan(sc, model_config, target_length=target, stage=stage, base_factors=base_factors,
                   base_length=int(config.base_length))
  if config.data.fitness == "needle":
    if tokenizer is None:
      raise SearchError("the needle fitness needs a tokenizer")
    windows, weights = needle_windows(documents, target, tokenizer.encode, bos_id=tokenizer.bos_id,
                                      seed=int(config.data.needle_seed))
  else:
    windows, weights = truncate_windows(documents, target), None
  fitness = PerplexityFitness(model_config, params, windows, weights,
                              candidates_per_call=int(sc.candidates_per_call), doc_batch=int(sc.doc_batch),
                              mesh=mesh, window_nll=window_nll)
  # iterations and early stopping are left out so a finished search can be resumed with more iterations.
  evolution = {k: v for k, v in dataclasses.asdict(plan.evolution).items()
               if k not in ("iterations", "early_stop_patience", "early_stop_tol")}
  fingerprint = fingerprint_of(
      plan.space.to_json(), evolution, {k: genome_key(g) for k, g in plan.seeds.items()},
      [plan.rotary_dim, plan.theta, plan.n_layers, plan.original_length, plan.target_length, int(sc.seed)],
      windows, np.zeros(0) if weights is None else weights)
  os.makedirs(workdir, exist_ok=True)
  state_path = os.path.join(workdir, STATE_FILE)
  if os.path.exists(state_path) and not config.resume:
    raise SearchError(f"{workdir} already holds a search state; set resume=True to continue it, or use "
                      "another workdir")
  start = time.perf_counter()
  result = evolve(plan.space, plan.evolution, plan.seeds,
                  lambda genomes: fitness([plan.rope_arrays(g) for g in genomes]),
                  rng=np.random.default_rng(int(sc.seed)), state_path=state_path, fingerprint=fingerprint,
                  resume=bool(config.resume), progress=bool(config.progress),
                  log_csv=os.path.join(workdir, "generations.csv"))
  seconds = time.perf_counter() - start
  scaling = plan.scaling(result.best)
  out = SearchResult(plan=plan, scaling=scaling, fitness=result.best_fitness, seed_fitness=result.seed_fitness,
                     evolution=result, compilations=fitness.compilations, seconds=seconds, workdir=workdir,
                     num_documents=fitness.num_documents)
  write_outputs(out, config)
  return out


def _provenance(result: SearchResult, config) -> dict:
  plan, evo = result.plan, result.evolution
  return {
      "source": "lrjax.search", "stage": plan.stage, "target_length": plan.target_length,
      "original_length": plan.original_length, "base_length": plan.base_length, "scale": plan.scale,
      "fitness": config.data.fitness, "best_fitness": _json_fit(result.fitness),
      "seed_fitness": {k: _json_fit(v) for k, v in result.seed_fitness.items()},
      "n_hat": genome_n_hat(plan.space, evo.best), "temperature": genome_temperature(plan.space, evo.best),
      "generations": evo.generations, "evaluations": evo.evaluations, "stopped_early": evo.stopped_early,
      "data_source": config.data.source, "num_documents": result.num_documents,
      "seed": int(config.search.seed), "search_space": plan.space.to_json(),
  }


def write_outputs(result: SearchResult, config) -> dict:
  """factors.json, factors.csv, rope_scaling_hf.json, summary.json and plots; returns {name: path}."""
  from lrjax import factors as factors_lib
  plan, wd = result.plan, result.workdir
  paths = {name: os.path.join(wd, name) for name in
           ("factors.json", "factors.csv", "rope_scaling_hf.json", "summary.json", "factors.png",
            "fitness.png", "generations.csv")}
  provenance = _provenance(result, config)
  factors_lib.save(paths["factors.json"], result.scaling, provenance, target_length=plan.target_length)
  factors_lib.save_csv(paths["factors.csv"], np.asarray(result.scaling.long_factor))
  hf_note = write_hf_snippet(paths["rope_scaling_hf.json"], result.scaling, rope_theta=plan.theta,
                             max_position_embeddings=plan.target_length, rotary_dim=plan.rotary_dim)
  summary = dict(provenance, compilations=result.compilations, seconds=round(result.seconds, 2), hf_note=hf_note)
  report.atomic_write(paths["summary.json"], json.dumps(summary, indent=1))
  plot_factors(paths["factors.png"], np.asarray(result.scaling.long_factor), plan.seed_factors,
               title=f"{plan.stage} search, {plan.target_length} tokens (s={plan.scale:g})")
  plot_fitness(paths["fitness.png"], result.evolution.log)
  return paths


def write_hf_snippet(path: str, scaling: rope_lib.RopeScaling, *, rope_theta: float,
                     max_position_embeddings: int, rotary_dim: int) -> str:
  """Writes the transformers config fields (Phi-3 style "longrope") for `scaling`; returns a note on what an
  HF config cannot carry (n̂, buckets, per-layer tables), or "" when nothing was lost."""
  from lrjax import factors as factors_lib
  notes = []
  if scaling.n_hat:
    notes.append(f"n_hat={scaling.n_hat} dropped (no HF form; the first n̂ positions get scaled angles there)")
  if scaling.buckets:
    notes.append("buckets dropped (HF has one short/long switch at original_max_position_embeddings)")
    scaling = scaling.replace(buckets=())
  for name, f in scaling.factor_sets():
    arr = np.asarray(f)
    if arr.ndim == 2:
      if not np.all(arr == arr[:1]):
        notes.append(f"per-layer {name} has no HF form; no snippet written")
        report.atomic_write(path, json.dumps({"error": "; ".join(notes)}, indent=1))
        return "; ".join(notes)
      scaling = scaling.replace(**{name: arr[0]})
  hf = factors_lib.rope_scaling_to_hf(scaling, rope_theta=rope_theta, max_position_embeddings=max_position_embeddings,
                                      rotary_dim=rotary_dim, allow_dropping_n_hat=True)
  hf["max_position_embeddings"] = int(max_position_embeddings)
  report.atomic_write(path, json.dumps(hf, indent=1))
  return "; ".join(notes)


def plot_factors(path: str, best: np.ndarray, references: Mapping[str, np.ndarray], *, title: str = "") -> None:
  """λ per frequency pair (log y): the searched factors against the seed methods (lrjax.report.line_plot)."""
  row = lambda f: np.asarray(f) if np.ndim(f) == 1 else np.asarray(f).mean(axis=0)  # per-layer: mean row
  series = {name: (np.arange(row(f).shape[-1]), row(f)) for name, f in references.items()}
  series["searched"] = (np.arange(row(best).shape[-1]), row(best))
  report.line_plot(path, series, xlabel="frequency pair i (high -> low frequency)", ylabel="rescale factor λ_i",
                   title=title, logy=True)


def plot_fitness(path: str, log: Sequence[Mapping]) -> None:
  """Best and mean (finite) fitness by generation, log y (lrjax.report.line_plot)."""
  gens = [r["generation"] for r in log]
  report.line_plot(path, {"best": (gens, [r["best_fitness"] for r in log]),
                          "population mean": (gens, [r["mean_fitness"] for r in log])},
                   xlabel="generation", ylabel="fitness (perplexity)", logy=True)


def run_short(config, model_config, params, documents: Sequence[np.ndarray], workdir: str, *,
              base_factors: np.ndarray, tokenizer=None, mesh=None, window_nll=None) -> dict:
  """Short-context recovery: one search per config.short_lengths on the extended model, then buckets.

  Each length's search goes to workdir/short_<length>/. The combined setting (workdir/factors.json,
  rope_scaling_hf.json) keeps `base_factors` as long_factor, uses the search at the largest length <= the
  original window as short_factor (Phi-3/transformers switch) and every length as a paper-style bucket.
  Returns {length: SearchResult, "scaling": combined RopeScaling}.
  """
  from lrjax import factors as factors_lib
  results = {}
  for length in sorted(int(n) for n in config.short_lengths):
    results[length] = run(config, model_config, params, documents, os.path.join(workdir, f"short_{length}"),
                          base_factors=base_factors, target_length=length, stage="short",
                          tokenizer=tokenizer, mesh=mesh, window_nll=window_nll)
  first = results[min(results)]
  original = first.plan.original_length
  at_window = [n for n in results if n <= original]
  short = results[max(at_window)].scaling.long_factor if at_window else None
  base = np.asarray(base_factors, np.float64)
  temperature = policy_temperature(first.plan.temperature_policy, original, int(config.base_length))
  scaling = rope_lib.RopeScaling(
      method="longrope", factor=int(config.base_length) / original, original_max_position_embeddings=original,
      long_factor=base, short_factor=short if short is not None else np.ones(base.shape[-1]),
      buckets=tuple((n, r.scaling.long_factor) for n, r in sorted(results.items())),
      attention_factor=temperature)
  provenance = {"source": "lrjax.search", "stage": "short", "original_length": original,
                "base_length": int(config.base_length), "base_factors": config.base_factors,
                "buckets": {str(n): {"best_fitness": _json_fit(r.fitness),
                                     "seed_fitness": {k: _json_fit(v) for k, v in r.seed_fitness.items()},
                                     "temperature": genome_temperature(r.plan.space, r.evolution.best)}
                            for n, r in results.items()}}
  factors_lib.save(os.path.join(workdir, "factors.json"), scaling, provenance,
                   target_length=int(config.base_length))
  write_hf_snippet(os.path.join(workdir, "rope_scaling_hf.json"), scaling, rope_theta=first.plan.theta,
                   max_position_embeddings=int(config.base_length), rotary_dim=first.plan.rotary_dim)
  results["scaling"] = scaling
  return results


BUILTIN_MODEL = os.path.join(os.path.dirname(__file__), "assets", "model")


def load_model(config):
  """(ModelConfig, params) of config.model ("builtin" or an HF directory) with execution settings applied."""
  path = BUILTIN_MODEL if config.model == "builtin" else config.model
  if not os.path.exists(path):
    raise SearchError(f"model {config.model!r}: {path} does not exist")
  from lrjax import weights
  model_config, params = weights.load(path)
  model_config = model_config.replace(dtype=config.dtype, attention=config.attention, block_q=config.block_q,
                                      block_k=config.block_k)
  return model_config, params


def main(config, workdir: str) -> dict | SearchResult:
  """Everything experiments/search.py does: load model, tokenizer, documents and base factors, then search."""
  validate_config(config)
  if not workdir:
    raise SearchError("--workdir is required")
  model_config, params = load_model(config)
  from lrjax import data, tokenizers
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  lengths = ([int(n) for n in config.short_lengths] if config.stage == "short"
             else [int(config.search.target_length)])
  documents = list(data.tokenized_documents(config.data.source, tokenizer, min_tokens=max(lengths),
                                            max_documents=int(config.data.num_documents)))
  if len(documents) < config.data.num_documents:
    raise SearchError(f"{config.data.source} has only {len(documents)} documents of at least {max(lengths)} "
                      f"tokens; {config.data.num_documents} requested")
  base = None
  if config.base_factors:
    from lrjax import factors as factors_lib
    try:
      loaded = factors_lib.load(config.base_factors, n_layers=model_config.num_layers,
                                rotary_dim=model_config.rotary_dim)
    except (ValueError, OSError) as e:
      raise SearchError(f"base_factors {config.base_factors}: {e}") from None
    base = np.asarray(loaded.long_factor, np.float64)
    if base.ndim == 2 and np.all(base == base[:1]):  # the paper's tables: identical rows per layer
      base = base[0]
  mesh = None
  if config.search.shard_candidates:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
  if config.stage == "short":
    return run_short(config, model_config, params, documents, workdir, base_factors=base, tokenizer=tokenizer,
                     mesh=mesh)
  return run(config, model_config, params, documents, workdir, base_factors=base, tokenizer=tokenizer,
             mesh=mesh)
