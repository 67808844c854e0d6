"""Running searches: one search (long or second stage), short-context recovery, and the CLI's whole job."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lrjax import data, perplexity
from lrjax import factors as factors_lib
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib
from lrjax import weights
from lrjax.search import evolution as evolution_lib
from lrjax.search import fitness as fitness_lib
from lrjax.search import outputs
from lrjax.search.config import validate_config
from lrjax.search.plan import Plan, make_plan
from lrjax.search.space import SearchError, genome_key

STATE_FILE = "search_state.json"


@dataclasses.dataclass
class SearchResult:
  """A finished search: the best setting, its fitness, the seeds' fitness, and where the outputs are."""

  plan: Plan
  scaling: rope_lib.RopeScaling
  fitness: float
  seed_fitness: dict
  evolution: evolution_lib.EvolutionResult
  compilations: int
  seconds: float
  workdir: str
  num_documents: int
  documents: dict | None = None   # which documents the fitness used (source, indices), when known


def _fitness_windows(config, documents, target: int, tokenizer):
  if config.data.fitness == "needle":
    if tokenizer is None:
      raise SearchError("the needle fitness needs a tokenizer")
    return fitness_lib.needle_windows(documents, target, tokenizer.encode, bos_id=tokenizer.bos_id,
                                      seed=int(config.data.needle_seed))
  return fitness_lib.truncate_windows(documents, target), None


def _fingerprint(plan: Plan, seed: int, windows, weights) -> str:
  # iterations and early stopping are left out so a finished search can be resumed with more iterations.
  evolution = {k: v for k, v in dataclasses.asdict(plan.evolution).items()
               if k not in ("iterations", "early_stop_patience", "early_stop_tol")}
  return evolution_lib.fingerprint_of(
      plan.space.to_json(), evolution, {k: genome_key(g) for k, g in plan.seeds.items()},
      [plan.rotary_dim, plan.theta, plan.n_layers, plan.original_length, plan.target_length, seed],
      windows, np.zeros(0) if weights is None else weights)


def run(config, model_config, params, documents: Sequence[np.ndarray], workdir: str, *,
        base: rope_lib.RopeScaling | None = None, target_length: int | None = None, stage: str | None = None,
        tokenizer=None, mesh=None, window_nll: Callable | None = None,
        document_info: dict | None = None) -> SearchResult:
  """One evolutionary search; writes factors, HF snippet, log, plots and state into `workdir`.

  Args:
    config: a configs/search.py ConfigDict (validated here).
    model_config, params: the model searched on (execution settings such as attention/dtype as given).
    documents: token sequences (1-D int arrays), each at least the target length.
    workdir: output directory; holds the resumable state.
    base: the fine-tuned setting of the second/short stage (its factors and n̂ carry over).
    target_length, stage: override config.search.target_length / config.stage (run_short uses these).
    tokenizer: lrjax.tokenizers tokenizer (encode, bos_id); needed by the needle fitness.
    mesh: optional jax Mesh with a "data" axis to shard candidates over.
    document_info: recorded in the summary (which documents of which source the fitness used).
  """
  validate_config(config)
  stage = stage or config.stage
  target = int(target_length or config.search.target_length)
  sc = config.search
  plan = make_plan(sc, model_config, target_length=target, stage=stage, base=base,
                   base_length=int(config.base_length))
  windows, weights = _fitness_windows(config, documents, target, tokenizer)
  fitness = fitness_lib.PerplexityFitness(model_config, params, windows, weights,
                                          candidates_per_call=int(sc.candidates_per_call),
                                          doc_batch=int(sc.doc_batch), mesh=mesh, window_nll=window_nll)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # epath: a gs:// workdir stays remote
  state_path = os.path.join(workdir, STATE_FILE)
  if epath.Path(state_path).exists() and not config.resume:
    raise SearchError(f"{workdir} already holds a search state; set resume=True to continue it, or use "
                      "another workdir")
  if jax.process_count() > 1:  # every process has looked before process 0 writes the first state
    multihost_utils.sync_global_devices(f"lrjax.search.start {workdir}")
  start = time.perf_counter()
  result = evolution_lib.evolve(
      plan.space, plan.evolution, plan.seeds, lambda genomes: fitness([plan.rope_arrays(g) for g in genomes]),
      rng=np.random.default_rng(int(sc.seed)), state_path=state_path,
      fingerprint=_fingerprint(plan, int(sc.seed), windows, weights), resume=bool(config.resume),
      progress=bool(config.progress), log_csv=os.path.join(workdir, "generations.csv"))
  out = SearchResult(plan=plan, scaling=plan.scaling(result.best), fitness=result.best_fitness,
                     seed_fitness=result.seed_fitness, evolution=result, compilations=fitness.compilations,
                     seconds=time.perf_counter() - start, workdir=workdir, num_documents=fitness.num_documents,
                     documents=document_info)
  if jax.process_index() == 0:
    outputs.write_outputs(out, config)
  return out


def run_short(config, model_config, params, documents: Sequence[np.ndarray], workdir: str, *,
              base: rope_lib.RopeScaling, tokenizer=None, mesh=None, window_nll=None,
              document_info: dict | None = None) -> dict:
  """Short-context recovery: one search per config.short_lengths on the extended model, then buckets.

  Each length's search goes to workdir/short_<length>/. The combined setting (workdir/factors.json,
  rope_scaling_hf.json) keeps the base setting (long factors, n̂, temperature), uses the search at the largest
  length <= the original window as short_factor (the Phi-3/transformers switch) and every length as a
  paper-style bucket. Returns {length: SearchResult, "scaling": combined RopeScaling}.
  """
  results = {}
  for length in sorted(int(n) for n in config.short_lengths):
    results[length] = run(config, model_config, params, documents, os.path.join(workdir, f"short_{length}"),
                          base=base, target_length=length, stage="short", tokenizer=tokenizer, mesh=mesh,
                          window_nll=window_nll, document_info=document_info)
  first = results[min(results)]
  original = first.plan.original_length
  at_window = [n for n in results if n <= original]
  base = rope_lib.resolve(base, original_length=original, target_length=int(config.base_length))
  long = np.asarray(base.long_factor, np.float64)
  scaling = base.replace(
      short_factor=results[max(at_window)].scaling.long_factor if at_window else np.ones(long.shape[-1]),
      buckets=tuple((n, r.scaling.long_factor) for n, r in sorted(results.items())),
      attention_factor=rope_lib.longrope_attention_factor(base), temperature_from="target")
  provenance = {"source": "lrjax.search", "stage": "short", "original_length": original,
                "base_length": int(config.base_length), "base_factors": config.base_factors,
                "buckets": {str(n): {"best_fitness": evolution_lib.json_fitness(r.fitness),
                                     "seed_fitness": {k: evolution_lib.json_fitness(v)
                                                      for k, v in r.seed_fitness.items()}}
                            for n, r in results.items()}}
  if jax.process_index() == 0:
    factors_lib.save(os.path.join(workdir, "factors.json"), scaling, provenance,
                     target_length=int(config.base_length))
    outputs.write_hf_snippet(os.path.join(workdir, "rope_scaling_hf.json"), scaling, rope_theta=first.plan.theta,
                             max_position_embeddings=int(config.base_length), rotary_dim=first.plan.rotary_dim)
  results["scaling"] = scaling
  return results


def load_base(config, model_config) -> rope_lib.RopeScaling | None:
  """The base setting of a second/short stage (config.base_factors), whole and resolved; per-layer tables with
  identical rows (the paper's published tables) become one row."""
  if not config.base_factors:
    return None
  try:
    base = factors_lib.resolve_file(config.base_factors, original_length=int(config.search.original_length
                                                                             or model_config.original_length),
                                    target_length=int(config.base_length), n_layers=model_config.num_layers,
                                    rotary_dim=model_config.rotary_dim)
  except (ValueError, OSError) as e:
    raise SearchError(f"base_factors {config.base_factors}: {e}") from None
  long = np.asarray(base.long_factor, np.float64)
  if long.ndim == 2 and np.all(long == long[:1]):
    base = base.replace(long_factor=long[0])
  return base


def fitness_documents(config, tokenizer, min_tokens: int) -> tuple[list[np.ndarray], dict]:
  """The fitness documents: N of the source's documents with >= min_tokens tokens, drawn at random (seeded by
  search.seed, as the paper samples 5 PG19 books) or the first N; and a record of which were used."""
  n = int(config.data.num_documents)
  docs = data.tokenized_documents(config.data.source, tokenizer, min_tokens=min_tokens,
                                  max_documents=None if config.data.sample_documents else n)
  if len(docs) < n:
    raise SearchError(f"{config.data.source} has only {len(docs)} documents of at least {min_tokens} tokens; "
                      f"{n} requested")
  chosen = (perplexity.sample_documents(n, len(docs), seed=int(config.search.seed)) if config.data.sample_documents
            else list(range(n)))
  info = {"source": config.data.source, "qualifying": len(docs), "indices": chosen,
          "sampled": bool(config.data.sample_documents), "tokens": [int(docs[i].shape[0]) for i in chosen]}
  return [docs[i] for i in chosen], info


def search_mesh(config):
  """The mesh of config.mesh over all devices (-1 = the rest), or None when every size is 1 (one device)."""
  sizes = config.mesh.to_dict()
  if all(int(v) == 1 for v in sizes.values()):
    return None
  return sharding_lib.make_mesh(sizes)


def main(config, workdir: str) -> dict | SearchResult:
  """Everything experiments/search.py does: load model, tokenizer, documents and base setting, then search."""
  validate_config(config)
  if not workdir:
    raise SearchError("--workdir is required")
  try:
    model_config, params = weights.load_model_for(config)
  except ValueError as e:
    raise SearchError(str(e)) from None
  tokenizer = weights.model_tokenizer(config.model, config.data.tokenizer)
  lengths = ([int(n) for n in config.short_lengths] if config.stage == "short"
             else [int(config.search.target_length)])
  documents, info = fitness_documents(config, tokenizer, max(lengths))
  base = load_base(config, model_config)
  mesh = search_mesh(config)
  kw = dict(base=base, tokenizer=tokenizer, mesh=mesh, document_info=info)
  if config.stage == "short":
    return run_short(config, model_config, params, documents, workdir, **kw)
  return run(config, model_config, params, documents, workdir, **kw)


def describe(result: SearchResult | dict) -> str:
  """One line per finished search (a short-recovery run has one per length)."""
  results = result if isinstance(result, dict) else {None: result}
  lines = []
  for length, r in results.items():
    if length == "scaling":
      continue
    seeds = ", ".join(f"{k} {v:.4g}" for k, v in r.seed_fitness.items())
    lines.append(f"{r.workdir}: best fitness {r.fitness:.4g} (seeds: {seeds}); {r.evolution.evaluations} "
                 f"evaluations, {r.evolution.generations} generations, {r.compilations} compilation(s), "
                 f"{r.seconds:.0f}s")
  return "\n".join(lines)
