"""What a finished search leaves in its workdir: factors (lrjax JSON, official CSV, transformers snippet),
summary.json, generations.csv (written by the loop) and plots."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from lrjax import factors as factors_lib
from lrjax import report
from lrjax import rope as rope_lib
from lrjax.search.evolution import json_fitness
from lrjax.search.space import genome_cd, genome_n_hat, genome_temperature


def provenance(result, config) -> dict:
  """How a search result was made (saved inside factors.json and summary.json)."""
  plan, evo = result.plan, result.evolution
  return {
      "source": "lrjax.search", "stage": plan.stage, "target_length": plan.target_length,
      "original_length": plan.original_length, "base_length": plan.base_length, "scale": plan.scale,
      "fitness": config.data.fitness, "best_fitness": json_fitness(result.fitness),
      "seed_fitness": {k: json_fitness(v) for k, v in result.seed_fitness.items()},
      "n_hat": genome_n_hat(plan.space, evo.best), "temperature": genome_temperature(plan.space, evo.best),
      "critical_dim": genome_cd(plan.space, evo.best),
      "generations": evo.generations, "evaluations": evo.evaluations, "stopped_early": evo.stopped_early,
      "data_source": config.data.source, "num_documents": result.num_documents,
      "documents": result.documents, "seed": int(config.search.seed), "search_space": plan.space.to_json(),
  }


def write_outputs(result, config) -> dict:
  """factors.json, factors.csv, rope_scaling_hf.json, summary.json and plots; returns {name: path}."""
  plan, wd = result.plan, result.workdir
  paths = {name: os.path.join(wd, name) for name in
           ("factors.json", "factors.csv", "rope_scaling_hf.json", "summary.json", "factors.png",
            "fitness.png", "generations.csv")}
  record = provenance(result, config)
  factors_lib.save(paths["factors.json"], result.scaling, record, target_length=plan.target_length)
  factors_lib.save_csv(paths["factors.csv"], np.asarray(result.scaling.long_factor))
  hf_note = write_hf_snippet(paths["rope_scaling_hf.json"], result.scaling, rope_theta=plan.theta,
                             max_position_embeddings=plan.target_length, rotary_dim=plan.rotary_dim)
  summary = dict(record, compilations=result.compilations, seconds=round(result.seconds, 2), hf_note=hf_note)
  report.write_json(paths["summary.json"], summary)
  plot_factors(paths["factors.png"], np.asarray(result.scaling.long_factor), plan.seed_factors,
               title=f"{plan.stage} search, {plan.target_length} tokens (s={plan.scale:g}, L={plan.original_length})")
  plot_fitness(paths["fitness.png"], result.evolution.log)
  return paths


def write_hf_snippet(path: str, scaling: rope_lib.RopeScaling, *, rope_theta: float,
                     max_position_embeddings: int, rotary_dim: int) -> str:
  """Writes the transformers config fields (Phi-3 style "longrope") for `scaling`; returns a note on what an
  HF config cannot carry (n̂, buckets, per-layer tables), or "" when nothing was lost."""
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
        report.write_json(path, {"error": "; ".join(notes)})
        return "; ".join(notes)
      scaling = scaling.replace(**{name: arr[0]})
  hf = factors_lib.rope_scaling_to_hf(scaling, rope_theta=rope_theta, max_position_embeddings=max_position_embeddings,
                                      rotary_dim=rotary_dim, allow_dropping_n_hat=True)
  hf["max_position_embeddings"] = int(max_position_embeddings)
  report.write_json(path, hf)
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
