"""From a search config and a model to everything one search needs: space, Algorithm-1 settings, seeds.

Stages: "long" searches absolute λ at a target (s = target / L); "second" (progressive) searches a multiplier on
a fine-tuned setting (s = target / base_length; the result is saved as the product); "short" searches absolute
λ at or near the original window on the extended model (short-context recovery). A base setting (second and
short) is carried whole: its n̂ stays (unless n̂ is searched again) and its factors seed the search.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from lrjax import factors as factors_lib
from lrjax import rope as rope_lib
from lrjax.search import evolution as evolution_lib
from lrjax.search import space as space_lib
from lrjax.search.space import SearchError, SearchSpace

STAGES = ("long", "second", "short")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a search on one target length needs besides the model weights and documents."""

  space: SearchSpace
  evolution: evolution_lib.Evolution
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
        long_factor=space_lib.genome_factors(self.space, genome), short_factor=short_factor, buckets=buckets,
        n_hat=space_lib.genome_n_hat(self.space, genome),
        attention_factor=space_lib.genome_temperature(self.space, genome))

  def rope_arrays(self, genome: np.ndarray) -> rope_lib.RopeArrays:
    return rope_lib.rope_arrays(self.scaling(genome), dim=self.rotary_dim, theta=self.theta,
                                n_layers=self.n_layers, max_position_embeddings=self.target_length)


def _nested_tuple(a: np.ndarray) -> tuple:
  return tuple(map(tuple, a.tolist())) if a.ndim == 2 else tuple(a.tolist())


def temperature_policy(value):
  if isinstance(value, str):
    if value in rope_lib.TEMPERATURES:
      return value
    try:
      return float(value)
    except ValueError:
      raise SearchError(f"unknown temperature policy {value!r}; expected 'su', 'yarn' or a number") from None
  return float(value)


def _temperatures(sc, policy, original: int, temperature_length: int) -> tuple:
  fixed = rope_lib.policy_temperature(policy, temperature_length / original, original)
  if not sc.search_temperature:
    return (fixed,)
  t_lo, t_hi = (float(x) for x in sc.temperature_range)
  if not 0 < t_lo <= t_hi:
    raise SearchError(f"temperature_range must satisfy 0 < lo <= hi, got {sc.temperature_range}")
  n_t = int(math.floor((t_hi - t_lo) / sc.temperature_step + 1e-9)) + 1
  return tuple(round(t_lo + i * sc.temperature_step, 10) for i in range(n_t))


def critical_dims(sc, rotary_dim: int, theta: float, original: int) -> tuple:
  """LongRoPE2's searched critical dimensions: [d_tcd^10, d_tcd] by default (pairs with 10 periods in the
  window up to the theoretical critical pair), or search.critical_dim_range; (0,) when off."""
  if not sc.critical_dim:
    return (0,)
  lo, hi = (int(x) for x in sc.critical_dim_range)
  if (lo, hi) == (0, 0):
    lo = space_lib.critical_dimension(rotary_dim, theta, original, periods=10)
    hi = space_lib.critical_dimension(rotary_dim, theta, original)
  if not 0 <= lo <= hi < rotary_dim // 2:
    raise SearchError(f"critical_dim_range ({lo}, {hi}) must satisfy 0 <= lo <= hi < {rotary_dim // 2}")
  return tuple(range(lo, hi + 1))


def _check_base(base: rope_lib.RopeScaling | None, stage: str, half: int, n_layers: int) -> np.ndarray | None:
  if base is None:
    if stage != "long":
      raise SearchError(f"stage {stage!r} needs the base setting (base_factors: the fine-tuned factors)")
    return None
  factors = np.asarray(base.long_factor, np.float64)
  if factors.shape[-1] != half:
    raise SearchError(f"base factors have {factors.shape[-1]} values per row; the model has {half} rotary "
                      "frequencies")
  if factors.ndim == 2 and factors.shape[0] != n_layers:
    raise SearchError(f"base factors have {factors.shape[0]} rows; the model has {n_layers} layers")
  return factors


def _seeds(sc, stage: str, space: SearchSpace, base: np.ndarray | None, *, scale: float, seed_original: int,
           rotary_dim: int, theta: float, n_layers: int, n_hat: int, temperature: float,
           scale_range) -> tuple[dict, dict]:
  """Seed genomes (snapped into the space) and the absolute factors they stand for."""
  seeds, seed_factors = {}, {}
  half = rotary_dim // 2
  for name in sc.seeds:
    if name not in space_lib.SEED_METHODS:
      raise SearchError(f"unknown seed {name!r}; expected one of {', '.join(space_lib.SEED_METHODS)}")
    if name == "critical":
      rng = np.random.default_rng([int(sc.seed), 7])
      for key, genome in space_lib.critical_seeds(space, scale_range, rng, n_hat=n_hat,
                                                  temperature=temperature).items():
        seeds[key], seed_factors[key] = genome, space_lib.genome_factors(space, genome)
      continue
    if name == "base":
      if base is None:
        raise SearchError("seed 'base' needs base_factors")
      rel = np.ones(half) if stage == "second" else (base if base.ndim == 1 else base.mean(axis=0))
      absolute = base
    else:
      rel = space_lib.method_factors(name, scale, rotary_dim=rotary_dim, theta=theta, original_length=seed_original,
                                     beta_fast=sc.yarn_beta_fast, beta_slow=sc.yarn_beta_slow)
      absolute = rel if stage != "second" else base * rel
    seeds[name] = space_lib.genome_from_factors(space, rel, n_hat=n_hat, temperature=temperature)
    seed_factors[name] = np.asarray(absolute, np.float64)
  for i, path in enumerate(sc.init_factors):
    try:
      loaded = factors_lib.load(path, n_layers=n_layers, rotary_dim=rotary_dim)
    except ValueError as e:
      raise SearchError(f"init_factors {path}: {e}") from None
    f = np.asarray(loaded.long_factor, np.float64)
    f = f if f.ndim == 1 else f.mean(axis=0)
    rel = f / (base if stage == "second" else 1.0)
    rel = rel if rel.ndim == 1 else rel.mean(axis=0)
    name = f"file{i}:{os.path.basename(path)}"
    seeds[name] = space_lib.genome_from_factors(space, rel, n_hat=loaded.n_hat if sc.search_n_hat else n_hat,
                                                temperature=temperature)
    seed_factors[name] = np.asarray(loaded.long_factor, np.float64)
  if not seeds:
    raise SearchError("no seeds: set search.seeds and/or search.init_factors")
  return seeds, seed_factors


def make_plan(search_config, model_config, *, target_length: int, stage: str = "long",
              base: rope_lib.RopeScaling | None = None, base_length: int = 0) -> Plan:
  """Search space, Algorithm-1 settings and seeds for one target length.

  Args:
    search_config: the `search` ConfigDict of configs/search.py.
    model_config: lrjax.model.ModelConfig of the model searched on (its original window is L unless
      search.original_length says otherwise).
    target_length: L' of this search.
    stage: "long", "second" or "short" (module docstring).
    base: the fine-tuned setting (second and short stages): its factors (f64[d/2] or [layers, d/2]) and n̂.
    base_length: the length the base was made for (second: the fine-tuning length).
  """
  sc = search_config
  d, theta, n_layers = model_config.rotary_dim, float(model_config.rope_theta), model_config.num_layers
  original = int(sc.original_length or model_config.original_length)
  if stage not in STAGES:
    raise SearchError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
  if target_length < original:
    raise SearchError(f"target length {target_length} is shorter than the model's original window {original}")
  if stage == "long" and target_length == original:
    raise SearchError(f"target length {target_length} equals the original window; a long search needs s > 1 "
                      "(use stage 'short' to search at the window)")
  base_factors = _check_base(base, stage, d // 2, n_layers)
  if stage == "second":
    if not base_length:
      raise SearchError("the second stage needs base_length (the fine-tuning length)")
    if target_length <= base_length:
      raise SearchError(f"second-stage target {target_length} must exceed the fine-tuning length {base_length}")
    scale, seed_original = target_length / base_length, base_length
  else:
    scale, seed_original = target_length / original, original
  policy = temperature_policy(sc.temperature)
  temperature_length = int(sc.temperature_length or target_length)
  fixed_temperature = rope_lib.policy_temperature(policy, temperature_length / original, original)
  # n̂ of a base setting is kept (one n̂ per setting); searched again only when asked.
  start_n_hat = (base.n_hat if base is not None else 0) if sc.search_n_hat or stage != "long" else int(sc.n_hat)
  n_hat_choices = tuple(int(n) for n in sc.n_hat_choices) if sc.search_n_hat else (start_n_hat,)
  space = SearchSpace(
      n_freqs=d // 2, factor_min=float(sc.min_factor_scale * scale + sc.min_factor_offset),
      factor_max=float(sc.max_factor_scale * scale + sc.max_factor_offset), step=float(sc.step),
      critical_dims=critical_dims(sc, d, theta, original), n_hat_choices=n_hat_choices,
      temperatures=_temperatures(sc, policy, original, temperature_length),
      base_factors=None if stage != "second" else _nested_tuple(base_factors))
  evolution = evolution_lib.Evolution(
      population=sc.population, mutations=sc.mutations, crossovers=sc.crossovers, parents=sc.parents,
      mutation_prob=sc.mutation_prob, iterations=sc.iterations, crossover_tries=sc.crossover_tries,
      max_tries=sc.max_tries, early_stop_patience=sc.early_stop_patience, early_stop_tol=sc.early_stop_tol)
  seeds, seed_factors = _seeds(sc, stage, space, base_factors, scale=scale, seed_original=seed_original,
                               rotary_dim=d, theta=theta, n_layers=n_layers, n_hat=start_n_hat,
                               temperature=fixed_temperature,
                               scale_range=(math.ceil(scale), math.floor(2 * scale)))
  return Plan(space=space, evolution=evolution, seeds=seeds, seed_factors=seed_factors,
              target_length=int(target_length), original_length=original, scale=float(scale),
              temperature_policy=policy, temperature_length=temperature_length, rotary_dim=d, theta=theta,
              n_layers=n_layers, stage=stage, base_length=int(base_length))
