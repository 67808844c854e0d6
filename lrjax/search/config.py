"""The search config (configs/search.py): its schema and the checks that relate several keys."""

from __future__ import annotations

from lrjax import schema
from lrjax.search.evolution import Evolution
from lrjax.search.space import SearchError
from lrjax.search.plan import STAGES
from lrjax.search.space import PAPER_N_HAT_CHOICES

FITNESS_KINDS = ("ppl", "needle")
_NUMBER = schema.FLOAT

SCHEMA = {
    "stage": schema.Key(str, choices=STAGES), "model": schema.STR, "dtype": schema.STR, "attention": schema.STR,
    "block_q": schema.POSITIVE_INT, "block_k": schema.POSITIVE_INT, "sliding_window": schema.Key(int, minimum=-1),
    "resume": schema.BOOL, "progress": schema.BOOL,
    "base_factors": schema.STR, "base_length": schema.NON_NEGATIVE_INT, "short_lengths": schema.SEQUENCE,
    "dry_run": schema.BOOL,
    "layout": {"model": schema.Key(object), "device_memory_gb": _NUMBER},
    "mesh": {"data": schema.INT, "fsdp": schema.INT, "sequence": schema.INT, "tensor": schema.INT},
    "data": {"source": schema.STR, "tokenizer": schema.STR, "num_documents": schema.POSITIVE_INT,
             "sample_documents": schema.BOOL, "fitness": schema.Key(str, choices=FITNESS_KINDS),
             "needle_seed": schema.INT},
    "search": {
        "target_length": schema.NON_NEGATIVE_INT, "original_length": schema.NON_NEGATIVE_INT,
        "population": schema.POSITIVE_INT, "mutations": schema.NON_NEGATIVE_INT,
        "crossovers": schema.NON_NEGATIVE_INT, "parents": schema.POSITIVE_INT, "mutation_prob": _NUMBER,
        "iterations": schema.NON_NEGATIVE_INT, "crossover_tries": schema.POSITIVE_INT,
        "max_tries": schema.POSITIVE_INT, "early_stop_patience": schema.NON_NEGATIVE_INT,
        "early_stop_tol": _NUMBER, "step": _NUMBER, "min_factor_scale": _NUMBER, "min_factor_offset": _NUMBER,
        "max_factor_scale": _NUMBER, "max_factor_offset": _NUMBER, "search_n_hat": schema.BOOL,
        "n_hat": schema.NON_NEGATIVE_INT, "n_hat_choices": schema.SEQUENCE,
        "temperature": schema.Key((str, float)), "temperature_length": schema.NON_NEGATIVE_INT,
        "search_temperature": schema.BOOL, "temperature_range": schema.SEQUENCE, "temperature_step": _NUMBER,
        "seeds": schema.SEQUENCE, "yarn_beta_fast": _NUMBER, "yarn_beta_slow": _NUMBER,
        "init_factors": schema.SEQUENCE, "critical_dim": schema.BOOL, "critical_dim_range": schema.SEQUENCE,
        "seed": schema.INT, "candidates_per_call": schema.POSITIVE_INT, "doc_batch": schema.POSITIVE_INT},
}


def validate_config(config) -> None:
  """Raises SearchError naming the first unknown, missing, mistyped or unused (for this stage) config value."""
  schema.check(config, SCHEMA, error=SearchError)
  stage, sc = config.stage, config.search
  if config.data.fitness != "needle" and config.data.needle_seed:
    raise SearchError("data.needle_seed is set but data.fitness is not 'needle'")
  if stage == "long" and (config.base_factors or config.base_length):
    raise SearchError("base_factors/base_length are only used by the 'second' and 'short' stages")
  if stage in ("second", "short") and not (config.base_factors and config.base_length):
    raise SearchError(f"stage {stage!r} needs base_factors (a factor file) and base_length")
  if stage in ("second", "short") and sc.n_hat:
    raise SearchError(f"stage {stage!r} keeps the n̂ of base_factors; leave search.n_hat at 0 (or search it with "
                      "search_n_hat=True)")
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
  if not sc.critical_dim and tuple(sc.critical_dim_range) != (0, 0):
    raise SearchError("search.critical_dim_range is set but search.critical_dim is False")
  if "critical" in sc.seeds and not sc.critical_dim:
    raise SearchError("seed 'critical' (LongRoPE2's initialisation) needs search.critical_dim=True")
  if not {"yarn", "yarn_hf"} & set(sc.seeds) and (sc.yarn_beta_fast, sc.yarn_beta_slow) != (32.0, 1.0):
    raise SearchError("search.yarn_beta_fast/yarn_beta_slow are set but no YaRN seed is among search.seeds")
  if "base" in sc.seeds and stage == "long":
    raise SearchError("seed 'base' needs base_factors, which stage 'long' does not use")
  Evolution(population=sc.population, mutations=sc.mutations, crossovers=sc.crossovers, parents=sc.parents,
            mutation_prob=sc.mutation_prob, iterations=sc.iterations,
            early_stop_patience=sc.early_stop_patience)
