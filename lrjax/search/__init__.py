"""LongRoPE evolutionary search for RoPE rescale factors (paper Algorithm 1, plus LongRoPE2 options).

  space       genomes, their decoding into factors, mutation and crossover, seeds (host side, numpy)
  evolution   Algorithm 1 with its resumable state
  fitness     documents -> windows -> population-parallel perplexity (the only part that runs jax programs)
  plan        config + model -> search space, settings and seeds for one stage
  stages      one search, short-context recovery, the CLI's job
  outputs     factor files, summary, plots
  config      the config schema and cross-key checks
"""

from lrjax.search.config import FITNESS_KINDS, SCHEMA, validate_config
from lrjax.search.evolution import Evolution, EvolutionResult, evolve, fingerprint_of, load_state
from lrjax.search.fitness import (PerplexityFitness, cached_nll_fn, make_nll_fn, needle_windows,
                                      truncate_windows)
from lrjax.search.outputs import plot_factors, plot_fitness, write_hf_snippet, write_outputs
from lrjax.search.plan import STAGES, Plan, critical_dims, make_plan
from lrjax.search.space import (PAPER_N_HAT_CHOICES, SEED_METHODS, SearchError, SearchSpace, critical_dimension,
                                    critical_seeds, crossover, genome_cd, genome_factors, genome_from_factors,
                                    genome_key, genome_n_hat, genome_temperature, is_valid, method_factors, mutate,
                                    searched_factors)
from lrjax.search.stages import (STATE_FILE, SearchResult, describe, fitness_documents, load_base, main, run,
                                     run_short, search_mesh)
