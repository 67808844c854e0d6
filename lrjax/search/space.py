"""The LongRoPE search space: genomes, their decoding into factors, the two genetic operators, and the seeds.

A genome is one int64 vector, host-side numpy, exact and hashable:

  [ticks_0 .. ticks_{d/2-1}, n_hat_index, temperature_index, critical_index]

  λ_i = factor_min + ticks_i · step         for pairs i >= cd (the grid is anchored at factor_min)
  λ_i = λ_cd^(i/cd)                         for pairs i < cd (LongRoPE2: NTK below the critical dimension)
  cd  = critical_dims[critical_index]       (a single (0,) = every pair searched, as in LongRoPE)
  n̂   = n_hat_choices[n_hat_index],  mscale = temperatures[temperature_index]

Ticks below cd carry no information and are kept at 0 (the canonical form), so equal settings have equal
genomes. In the progressive second stage the decoded λ multiplies the fine-tuned factors. A gene that is not
searched has a single choice (index 0).

The operators take an explicit np.random.Generator and only ever return valid genomes: on the grid, within
[factor_min, factor_max], non-decreasing over the searched pairs, indices in range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from lrjax import rope as rope_lib

# The paper's n̂ set (Table 4). The official internal code uses {1,...,32,48,64} instead.
PAPER_N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
# Seeds: "yarn" is the official code's linear ramp in λ, "yarn_hf" the inverse of transformers' frequency
# blend; "base" the fine-tuned factors (second and short stages); "critical" LongRoPE2's initialisation.
SEED_METHODS = ("pi", "ntk", "yarn", "yarn_hf", "identity", "base", "critical")
_EXTRA_GENES = 3  # n̂, temperature, critical dimension


class SearchError(ValueError):
  """A search setting, input file or state that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Where genomes live.

  n_freqs: rotary pairs d/2. factor_min/factor_max: bounds of searched λ (relative ones in the second stage).
  step: grid step. critical_dims: allowed critical dimensions cd (pairs below cd follow NTK; (0,) = none).
  n_hat_choices: allowed n̂ (one value = fixed). temperatures: allowed attention temperatures (one = fixed).
  base_factors: λ_ft for the second stage (f64 [d/2] or [layers, d/2] as nested tuples), None otherwise.
  """

  n_freqs: int
  factor_min: float
  factor_max: float
  step: float = 0.01
  critical_dims: tuple = (0,)
  n_hat_choices: tuple = (0,)
  temperatures: tuple = (1.0,)
  base_factors: tuple | None = None

  def __post_init__(self):
    if self.step <= 0:
      raise SearchError(f"grid step must be positive, got {self.step}")
    if not 0 < self.factor_min <= self.factor_max:
      raise SearchError(f"factor bounds must satisfy 0 < min <= max, got [{self.factor_min}, {self.factor_max}]")
    if not self.critical_dims or any(not 0 <= c < self.n_freqs for c in self.critical_dims):
      raise SearchError(f"critical dimensions {self.critical_dims} outside 0..{self.n_freqs - 1}")
    if not self.n_hat_choices or not self.temperatures:
      raise SearchError("n_hat_choices and temperatures need at least one value each")
    if any(n < 0 for n in self.n_hat_choices):
      raise SearchError(f"n̂ choices must be >= 0, got {self.n_hat_choices}")
    if self.base_factors is not None and np.shape(self.base_factors)[-1] != self.n_freqs:
      raise SearchError(f"base factors have {np.shape(self.base_factors)[-1]} values per row; the model has "
                        f"{self.n_freqs} rotary frequencies")

  @property
  def genome_size(self) -> int:
    return self.n_freqs + _EXTRA_GENES

  @property
  def max_ticks(self) -> int:
    return int(math.floor((self.factor_max - self.factor_min) / self.step + 1e-9))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def genome_key(genome: np.ndarray) -> tuple:
  """Hashable identity of a genome (the fitness-cache key)."""
  return tuple(int(x) for x in genome)


def genome_cd(space: SearchSpace, genome: np.ndarray) -> int:
  return int(space.critical_dims[int(genome[-1])])


def genome_n_hat(space: SearchSpace, genome: np.ndarray) -> int:
  return int(space.n_hat_choices[int(genome[-3])])


def genome_temperature(space: SearchSpace, genome: np.ndarray) -> float:
  return float(space.temperatures[int(genome[-2])])


def is_valid(space: SearchSpace, genome: np.ndarray) -> bool:
  """In range, on the grid (integer ticks), canonical below cd, non-decreasing, gene indices in range."""
  g = np.asarray(genome)
  if g.shape != (space.genome_size,) or not np.issubdtype(g.dtype, np.integer):
    return False
  if not (0 <= g[-3] < len(space.n_hat_choices) and 0 <= g[-2] < len(space.temperatures)
          and 0 <= g[-1] < len(space.critical_dims)):
    return False
  cd, ticks = genome_cd(space, g), g[:space.n_freqs]
  return bool(np.all(ticks[:cd] == 0) and np.all(ticks[cd:] >= 0) and np.all(ticks[cd:] <= space.max_ticks)
              and np.all(np.diff(ticks[cd:]) >= 0))


def searched_factors(space: SearchSpace, genome: np.ndarray) -> np.ndarray:
  """The searched λ of pairs cd.. (relative in the second stage), f64[d/2 - cd]."""
  cd = genome_cd(space, genome)
  ticks = np.asarray(genome[cd:space.n_freqs], np.float64)
  return np.round(space.factor_min + ticks * space.step, 10)


def genome_factors(space: SearchSpace, genome: np.ndarray) -> np.ndarray:
  """The factors a genome applies: f64[d/2], or [layers, d/2] when the second-stage base is per layer."""
  lam = searched_factors(space, genome)
  cd = genome_cd(space, genome)
  if cd:  # LongRoPE2: NTK below the critical dimension, anchored at λ_cd (λ_0 = 1)
    lam = np.concatenate([lam[0] ** (np.arange(cd, dtype=np.float64) / cd), lam])
  if space.base_factors is not None:
    lam = np.asarray(space.base_factors, np.float64) * lam
  return lam


def _index_of(choices, value) -> int:
  return int(np.argmin([abs(c - value) for c in choices]))


def genome_from_factors(space: SearchSpace, factors: np.ndarray, *, n_hat: int = 0,
                        temperature: float | None = None, critical_dim: int | None = None) -> np.ndarray:
  """Nearest valid genome to factors f64[d/2] (relative ones in the second stage): snapped to the grid,
  clipped, made non-decreasing. n̂, temperature and cd snap to the nearest choice (cd: the first by default)."""
  f = np.asarray(factors, np.float64)
  if f.shape != (space.n_freqs,):
    raise SearchError(f"seed factors have shape {f.shape}; expected ({space.n_freqs},)")
  c_index = 0 if critical_dim is None else _index_of(space.critical_dims, critical_dim)
  cd = space.critical_dims[c_index]
  ticks = np.rint((f - space.factor_min) / space.step).astype(np.int64)
  ticks = np.maximum.accumulate(np.clip(ticks, 0, space.max_ticks))
  ticks[:cd] = 0
  t = space.temperatures[0] if temperature is None else temperature
  extra = [_index_of(space.n_hat_choices, n_hat), _index_of(space.temperatures, t), c_index]
  return np.concatenate([ticks, extra]).astype(np.int64)


def _move_critical_dim(space: SearchSpace, child: np.ndarray, new_index: int) -> None:
  """Sets the cd gene in place, keeping the factors continuous: pairs that become searched start from their
  NTK values (snapped, capped by λ_cd), pairs that stop being searched drop to the canonical 0."""
  old, new = genome_cd(space, child), int(space.critical_dims[new_index])
  if new < old:
    lam_cd = space.factor_min + child[old] * space.step
    ntk = lam_cd ** (np.arange(new, old, dtype=np.float64) / old)
    child[new:old] = np.clip(np.rint((ntk - space.factor_min) / space.step), 0, child[old]).astype(np.int64)
  else:
    child[:new] = 0
  child[-1] = new_index


def mutate(space: SearchSpace, parent: np.ndarray, prob: float, rng: np.random.Generator,
           is_new: Callable[[np.ndarray], bool] = lambda g: True, max_tries: int = 100) -> np.ndarray | None:
  """A mutant of `parent`, or None if `max_tries` attempts gave nothing new.

  The cd gene is resampled with probability `prob` first; then each searched λ is resampled with probability
  `prob`, uniformly on the grid between its (already updated) left neighbour and its right neighbour (the
  space bounds at the ends), so the child stays non-decreasing. n̂ and temperature genes are resampled
  uniformly with the same probability.
  """
  n, top = space.n_freqs, space.max_ticks
  for _ in range(max_tries):
    child = np.array(parent, np.int64)
    fire = rng.random(n + _EXTRA_GENES) < prob
    if fire[n + 2] and len(space.critical_dims) > 1:
      _move_critical_dim(space, child, int(rng.integers(len(space.critical_dims))))
    cd = genome_cd(space, child)
    for j in np.flatnonzero(fire[cd:n]) + cd:
      lo = child[j - 1] if j > cd else 0
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

  A try whose child is not valid (not non-decreasing over its searched pairs) or not new is discarded, as in
  the official code; up to `tries`. Ticks below the child's cd are canonicalised to 0.
  """
  p1, p2 = np.asarray(parent1, np.int64), np.asarray(parent2, np.int64)
  for _ in range(tries):
    take = (rng.random(p1.shape[0]) < prob) & (rng.random(p1.shape[0]) < 0.5)
    child = np.where(take, p2, p1)
    child[:genome_cd(space, child)] = 0
    if is_valid(space, child) and not np.array_equal(child, p1) and is_new(child):
      return child
  return None


# ----------------------------------------------------------------------------------------------------------
# Seeds and critical dimensions.


def critical_dimension(rotary_dim: int, theta: float, original_length: int, periods: float = 1.0) -> int:
  """LongRoPE2's critical pair index ceil((d/2)·log_θ(L_train / (2π·periods))), clamped to [0, d/2 − 1].

  periods=1 is the theoretical d_tcd (the first pair whose period exceeds the training window: Phi3-mini 31,
  LLaMA3-8B 35); periods=10 the lower end of the searched range (pairs with 10 full periods: 19 and 24).
  """
  cd = math.ceil((rotary_dim / 2) * math.log(original_length / (2 * math.pi * periods)) / math.log(theta))
  return min(max(cd, 0), rotary_dim // 2 - 1)


def method_factors(method: str, scale: float, *, rotary_dim: int, theta: float, original_length: int,
                   beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
  """Seed factors λ (f64[d/2]) of a method at extension ratio `scale`.

  pi: λ_i = s. ntk: λ_i = s^(2i/(d-2)) (the NTK base change b·s^(d/(d-2))). yarn: the official LongRoPE
  seed, linear in λ over YaRN's ramp: λ_i = 1 + (s − 1)·clamp((i − low)/(high − low), 0, 1) with transformers'
  truncated correction range (LLaMA2-7B: ones to i = 20, 3.4231 at 21, s from 46). yarn_hf: the inverse of
  transformers' inverse-frequency blend, 1 / (ramp_i / s + 1 − ramp_i). identity: ones.
  """
  half = rotary_dim // 2
  i = np.arange(half, dtype=np.float64)
  if method == "identity" or scale == 1.0:
    return np.ones(half)
  if method == "pi":
    return np.full(half, float(scale))
  if method == "ntk":
    return float(scale) ** (2 * i / (rotary_dim - 2))
  low, high = rope_lib.yarn_correction_range(rotary_dim, theta, original_length, beta_fast, beta_slow)
  ramp = np.clip((i - low) / max(high - low, 1e-3), 0, 1)
  if method == "yarn":
    return 1 + (float(scale) - 1) * ramp
  if method == "yarn_hf":
    return 1 / (ramp / float(scale) + (1 - ramp))
  raise SearchError(f"unknown seed method {method!r}; expected one of {', '.join(SEED_METHODS)}")


def critical_seeds(space: SearchSpace, scale_range: tuple[int, int], rng: np.random.Generator,
                   *, n_hat: int = 0, temperature: float | None = None) -> dict[str, np.ndarray]:
  """LongRoPE2's initial population: for each critical dimension d_rcd, λ[d_rcd:] = s with s drawn uniformly
  from the integers in [lo, hi] (L/L_train .. 2L/L_train), NTK from λ_{d_rcd} below."""
  lo, hi = scale_range
  seeds = {}
  for cd in space.critical_dims:
    s = float(rng.integers(int(lo), int(hi) + 1))
    seeds[f"critical{cd}"] = genome_from_factors(space, np.full(space.n_freqs, s), n_hat=n_hat,
                                                 temperature=temperature, critical_dim=cd)
  return seeds
