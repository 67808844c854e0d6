"""LongRoPE Algorithm 1 on genomes, with a resumable state.

Generation 0 evaluates the seeds and P − (#seeds) mutants of them (taken from the seeds in turn). Then each of
`iterations` generations keeps the top-k as parents, adds N1 mutants of random parents and N2 crossovers of two
distinct random parents (a failed crossover mutates its first parent), and sends only genomes never evaluated
before to the fitness function. Lower fitness is better; non-finite fitness (a diverged candidate) sorts last.

The whole state (population, fitness cache, RNG, generation, log) is one JSON document written atomically after
every generation; resuming from it reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from lrjax import report
from lrjax.search import space as space_lib
from lrjax.search.space import SearchError, SearchSpace, genome_key

STATE_VERSION = 2
LOG_FIELDS = ("generation", "best_fitness", "mean_fitness", "evaluations", "total_evaluations", "seconds")


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


@dataclasses.dataclass
class State:
  """Everything a search needs to continue: what is saved after every generation."""

  population: list = dataclasses.field(default_factory=list)   # genomes, best first
  cache: dict = dataclasses.field(default_factory=dict)        # genome_key -> fitness
  generation: int = -1                                         # -1 = generation 0 not yet evaluated
  log: list = dataclasses.field(default_factory=list)
  stale: int = 0                                               # generations without improvement
  stopped: bool = False

  def fitness(self, genome) -> float:
    return self.cache[genome_key(genome)]


def _fit(value) -> float:
  value = float(value)
  return value if math.isfinite(value) else math.inf


def json_fitness(value: float):
  return value if math.isfinite(value) else None


def _rank(population: list[np.ndarray], cache: dict) -> list[np.ndarray]:
  """Best first; ties broken by the genome itself so the order never depends on insertion order."""
  return sorted(population, key=lambda g: (cache[genome_key(g)], genome_key(g)))


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
# State files.

_STATE_KEYS = {"version", "fingerprint", "generation", "stale", "stopped_early", "done", "rng", "population",
               "cache", "log", "seeds"}


def save_state(path: str, state: State, rng: np.random.Generator, *, fingerprint: str, done: bool,
               seeds: Mapping[str, np.ndarray]) -> None:
  payload = {
      "version": STATE_VERSION, "fingerprint": fingerprint, "generation": state.generation, "stale": state.stale,
      "stopped_early": state.stopped, "done": done, "rng": rng.bit_generator.state,
      "population": [genome_key(g) for g in state.population],
      "cache": [[list(k), json_fitness(f)] for k, f in state.cache.items()], "log": state.log,
      "seeds": {name: genome_key(g) for name, g in seeds.items()},
  }
  report.atomic_write(path, json.dumps(payload))


def load_state(path: str, fingerprint: str, rng: np.random.Generator) -> State:
  """The saved state (and `rng` set to its saved position); one-line errors for any unusable file."""
  try:
    doc = json.loads(epath.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise SearchError(f"cannot read search state {path}: {e}") from None
  if not isinstance(doc, dict):
    raise SearchError(f"search state {path} is not a JSON object")
  if doc.get("version") != STATE_VERSION:
    raise SearchError(f"search state {path} has version {doc.get('version')!r}, expected {STATE_VERSION} "
                      "(written by another lrjax version); use a fresh workdir")
  missing = sorted(_STATE_KEYS - set(doc))
  if missing:
    raise SearchError(f"search state {path} lacks {', '.join(missing)} (truncated or edited); use a fresh workdir")
  if doc["fingerprint"] != fingerprint:
    raise SearchError(f"search state {path} was written by a different search (settings, model shape or "
                      "documents differ); use a fresh workdir or set resume=False")
  try:
    rng.bit_generator.state = doc["rng"]
    return State(population=[np.asarray(g, np.int64) for g in doc["population"]],
                 cache={tuple(int(x) for x in g): (math.inf if f is None else float(f)) for g, f in doc["cache"]},
                 generation=int(doc["generation"]), log=list(doc["log"]), stale=int(doc["stale"]),
                 stopped=bool(doc["stopped_early"]))
  except (TypeError, ValueError, KeyError) as e:
    raise SearchError(f"search state {path} is malformed ({type(e).__name__}: {e}); use a fresh workdir") from None


def write_log_csv(path: str, rows: Sequence[Mapping]) -> None:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=LOG_FIELDS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: row[k] for k in LOG_FIELDS})
  report.atomic_write(path, out.getvalue())


# ----------------------------------------------------------------------------------------------------------
# The loop.


def _evaluate(space: SearchSpace, state: State, genomes: list[np.ndarray], fitness_fn) -> int:
  """Evaluates the genomes not in the cache (each once); returns how many were new."""
  new, seen = [], set()
  for g in genomes:
    k = genome_key(g)
    if k not in state.cache and k not in seen:
      if not space_lib.is_valid(space, g):
        raise AssertionError(f"refusing to evaluate an invalid genome {k}")
      new.append(g)
      seen.add(k)
  if new:
    for g, v in zip(new, np.asarray(fitness_fn(new), np.float64)):
      state.cache[genome_key(g)] = _fit(v)
  return len(new)


def _record(state: State, seconds: float, evaluated: int) -> None:
  fits = np.array([state.fitness(g) for g in state.population])
  finite = fits[np.isfinite(fits)]
  state.log.append({"generation": state.generation, "best_fitness": float(fits[0]),
                    "mean_fitness": float(finite.mean()) if finite.size else math.inf,
                    "evaluations": evaluated, "total_evaluations": len(state.cache),
                    "seconds": round(seconds, 3)})


def initial_population(space: SearchSpace, evolution: Evolution, seeds: Mapping[str, np.ndarray],
                       rng: np.random.Generator) -> list[np.ndarray]:
  """The seeds (deduplicated) plus mutants of them, taken from the seeds in turn, up to P genomes."""
  pending: dict[tuple, np.ndarray] = {}
  for g in seeds.values():
    pending.setdefault(genome_key(g), g)
  seed_list = list(pending.values())
  is_new = lambda g: genome_key(g) not in pending
  for i in range(max(evolution.population - len(seed_list), 0)):
    child = space_lib.mutate(space, seed_list[i % len(seed_list)], evolution.mutation_prob, rng, is_new,
                             evolution.max_tries)
    if child is not None:
      pending[genome_key(child)] = child
  return list(pending.values())


def offspring(space: SearchSpace, evolution: Evolution, parents: list[np.ndarray], cache: dict,
              rng: np.random.Generator) -> list[np.ndarray]:
  """N1 mutants of random parents and N2 crossovers of two distinct random parents, all never seen before."""
  taken = {genome_key(g) for g in parents}
  is_new = lambda g: genome_key(g) not in cache and genome_key(g) not in taken
  children = []

  def add(child):
    if child is not None:
      taken.add(genome_key(child))
      children.append(child)

  mutate = lambda parent: space_lib.mutate(space, parent, evolution.mutation_prob, rng, is_new,
                                           evolution.max_tries)
  for _ in range(evolution.mutations):
    add(mutate(parents[int(rng.integers(len(parents)))]))
  for _ in range(evolution.crossovers):
    if len(parents) < 2:
      add(mutate(parents[0]))
      continue
    i, j = sorted(int(x) for x in rng.choice(len(parents), 2, replace=False))
    child = space_lib.crossover(space, parents[i], parents[j], evolution.mutation_prob, rng, is_new,
                                evolution.crossover_tries)
    add(child if child is not None else mutate(parents[i]))
  return children


def evolve(space: SearchSpace, evolution: Evolution, seeds: Mapping[str, np.ndarray],
           fitness_fn: Callable[[list[np.ndarray]], np.ndarray], *, rng: np.random.Generator,
           state_path: str | None = None, fingerprint: str = "", resume: bool = False,
           progress: bool = False, log_csv: str | None = None) -> EvolutionResult:
  """Algorithm 1 (see the module docstring). `fitness_fn` maps a list of genomes to f64 fitness.

  With `state_path`, the state is written atomically after each generation; `resume=True` continues from it
  (a finished search returns at once; one resumed with more `iterations` runs the extra generations).
  """
  seeds = {name: np.asarray(g, np.int64) for name, g in seeds.items()}
  for name, g in seeds.items():
    if not space_lib.is_valid(space, g):
      raise SearchError(f"seed {name!r} is not a valid genome for this search space")
  state = State()
  if resume and state_path and epath.Path(state_path).exists():
    state = load_state(state_path, fingerprint, rng)

  def save():
    if jax.process_index():  # every process evolves identically; process 0 alone writes
      return
    if state_path:
      done = state.stopped or state.generation >= evolution.iterations
      save_state(state_path, state, rng, fingerprint=fingerprint, done=done, seeds=seeds)
    if log_csv:
      write_log_csv(log_csv, state.log)

  bar = None
  if progress:
    bar = tqdm(total=evolution.iterations + 1, initial=state.generation + 1, desc="search", unit="gen")
  try:
    while state.generation < 0 or (not state.stopped and state.generation < evolution.iterations):
      start = time.perf_counter()
      if state.generation < 0:
        population = initial_population(space, evolution, seeds, rng)
        evaluated = _evaluate(space, state, population, fitness_fn)
        improved = True
      else:
        parents = state.population[:evolution.parents]
        children = offspring(space, evolution, parents, state.cache, rng)
        evaluated = _evaluate(space, state, children, fitness_fn)
        population = parents + children
        improved = state.fitness(state.population[0]) - min(state.cache[genome_key(g)] for g in population) \
            > evolution.early_stop_tol
      state.generation += 1
      state.population = _rank(population, state.cache)
      state.stale = 0 if improved else state.stale + 1
      if state.generation and evolution.early_stop_patience and state.stale >= evolution.early_stop_patience:
        state.stopped = state.generation < evolution.iterations
      _record(state, time.perf_counter() - start, evaluated)
      save()
      if bar is not None:
        bar.update(1)
        bar.set_postfix(best=f"{state.log[-1]['best_fitness']:.4g}", evals=len(state.cache))
    save()
  finally:
    if bar is not None:
      bar.close()
  best = state.population[0]
  return EvolutionResult(
      best=best, best_fitness=state.fitness(best), seed_fitness={n: state.fitness(g) for n, g in seeds.items()},
      population=[(g, state.fitness(g)) for g in state.population], log=state.log,
      evaluations=len(state.cache), generations=state.generation + 1, stopped_early=state.stopped)
