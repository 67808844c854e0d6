"""Evolutionary-search fitness throughput: population-parallel (vmap over C candidates) vs one-by-one.

Both sides compute the same perplexities (checked before timing) of K candidate factor sets at 8x the built-in
model's window (2048 tokens) on the same windows:
  parallel:   lrjax.search.PerplexityFitness(candidates_per_call=C): one compiled program, jax.vmap over a
              stacked RopeArrays of C candidates (last chunk padded)
  one-by-one: candidates_per_call=1: the same window_nll jitted without vmap, one call per candidate
Runs alternate (parallel, one-by-one, ...) so load from other processes hits both alike; the first call of
each is warm-up (compilation) and excluded; the figure is the median of the timed runs. Then a whole small
search (lrjax.search.evolve) counts its compilations (traces of the fitness program and XLA backend compiles).

  python benchmarks/search_throughput.py                 # built-in model if present, else random same shape
  python benchmarks/search_throughput.py --candidates=8 --population=16 --runs=5
  python benchmarks/search_throughput.py --quick         # smaller, for a smoke run
  python benchmarks/search_throughput.py --tiny          # the launch-overhead-bound regime

The ratio parallel / one-by-one is a ratio of two timings: withheld when the machine was busy
(benchmarks/harness.py); the compilation counts do not depend on the load.
"""

from __future__ import annotations

import argparse
import os

import harness  # first: puts the repository root on sys.path


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--candidates", type=int, default=4, help="C, candidates per compiled call")
  p.add_argument("--population", type=int, default=8, help="K candidates evaluated per timed run")
  p.add_argument("--documents", type=int, default=2, help="windows per candidate (one batch)")
  p.add_argument("--length", type=int, default=2048, help="window length (8x the built-in 256)")
  p.add_argument("--runs", type=int, default=3, help="timed runs of each side (after one warm-up)")
  p.add_argument("--attention", default=None, help="override the attention implementation")
  p.add_argument("--generations", type=int, default=3, help="iterations of the compile-count search")
  p.add_argument("--tiny", action="store_true",
                 help="the tests' random tiny model (d 32, 2 layers, window 32) at 8x = 256 tokens: the "
                      "launch-overhead-bound regime")
  return harness.parse_args(p, quick=dict(length=512, candidates=4, population=4, runs=1, generations=2))


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lrjax import model as model_lib  # noqa: E402
from lrjax import search  # noqa: E402

_BACKEND_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _BACKEND_COMPILES.append(duration)
    if event.endswith("backend_compile_duration") else None)


def load_model():
  if ARGS.tiny:
    cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                num_kv_heads=2, head_dim=16, max_position_embeddings=32)
    return cfg, model_lib.init_params(cfg, jax.random.PRNGKey(0)), "random tiny model (tests' shape)"
  if os.path.isdir(weights.BUILTIN_MODEL):
    from lrjax import weights
    cfg, params = weights.load(weights.BUILTIN_MODEL)
    what = f"built-in model ({weights.BUILTIN_MODEL})"
  else:
    # The built-in model's shape (configs/pretrain.py): byte vocab, d 256, 4 layers, 4/2 heads, head_dim 64.
    cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4,
                                num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    what = "random model of the built-in model's shape (lrjax/assets/model not present)"
  if ARGS.attention:
    cfg = cfg.replace(attention=ARGS.attention)
  return cfg, params, what


def main():
  bench = harness.Bench.start("search_throughput", ARGS)
  if ARGS.tiny:
    ARGS.length = 256
  cfg, params, what = load_model()
  rng = np.random.default_rng(0)
  windows = rng.integers(0, cfg.vocab_size, (ARGS.documents, ARGS.length)).astype(np.int32)
  from configs import search as search_configs
  c = search_configs.get_config("tiny")
  c.search.target_length = ARGS.length
  plan = search.make_plan(c.search, cfg, target_length=ARGS.length)
  genomes = list(plan.seeds.values())
  while len(genomes) < ARGS.population:
    genomes.append(search.mutate(plan.space, genomes[len(genomes) % 3], 0.3, rng))
  ropes = [plan.rope_arrays(g) for g in genomes[:ARGS.population]]
  print(f"model: {what}; attention={cfg.attention}; {jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"fitness: {ARGS.population} candidates x {ARGS.documents} windows of {ARGS.length} tokens "
        f"(random tokens; content does not change the cost), C={ARGS.candidates}")

  parallel = search.PerplexityFitness(cfg, params, windows, candidates_per_call=ARGS.candidates,
                                      doc_batch=ARGS.documents)
  single = search.PerplexityFitness(cfg, params, windows, candidates_per_call=1, doc_batch=ARGS.documents)
  timings = {"parallel": [], "one-by-one": []}
  results = {}
  for run in range(ARGS.runs + 1):
    for name, fn in (("parallel", parallel), ("one-by-one", single)):
      with harness.timed() as timing:
        results[name] = fn(ropes)
      if run:
        timings[name].append(timing)
      else:
        print(f"  warm-up {name}: {timing} (includes compilation)")
    if run == 0:
      diff = np.max(np.abs(results["parallel"] / results["one-by-one"] - 1))
      print(f"  max relative difference parallel vs one-by-one: {diff:.2e}")
      assert diff < 1e-5, "population-parallel and one-by-one fitness disagree"
  rate = {}
  for k, v in timings.items():
    median = harness.median_timing(v)
    rate[k] = ARGS.population / median.wall_s
    shown = bench.figure(f"{k}: C={ARGS.candidates if k == 'parallel' else 1}, {ARGS.length} tokens", rate[k],
                         "candidate evaluations/s", fmt=".3f")
    print(f"{k:>11}: {shown} candidate evaluations/s (median {median} for {ARGS.population}; runs "
          f"{', '.join(f'{x.wall_s:.2f}' for x in v)})")
  print(f"ratio parallel / one-by-one: {bench.ratio('parallel / one-by-one', rate['parallel'] / rate['one-by-one'])}"
        f" (target >= 1.5x)")
  count_compilations(c, cfg, params, windows, bench)
  bench.finish()


def count_compilations(c, cfg, params, windows, bench: harness.Bench) -> None:
  """A whole small search on a fresh program (C=3, used by nothing above): counts its compilations."""
  c.search.population, c.search.mutations, c.search.crossovers, c.search.parents = 8, 3, 3, 4
  c.search.iterations = ARGS.generations
  plan = search.make_plan(c.search, cfg, target_length=ARGS.length)
  fitness = search.PerplexityFitness(cfg, params, windows, candidates_per_call=3, doc_batch=ARGS.documents)
  per_generation = []

  def fitness_fn(gs):
    before = len(_BACKEND_COMPILES)
    out = fitness([plan.rope_arrays(g) for g in gs])
    per_generation.append(len(_BACKEND_COMPILES) - before)
    return out

  with harness.timed() as timing:
    result = search.evolve(plan.space, plan.evolution, plan.seeds, fitness_fn, rng=np.random.default_rng(0))
  bench.figure("small search: fitness-program compilations", fitness.compilations, "", timed=False, fmt="d")
  bench.figure("small search: XLA backend compiles per generation", str(per_generation), "", timed=False)
  print(f"small search: {result.generations} generations, {result.evaluations} evaluations in {timing}; "
        f"fitness-program compilations: {fitness.compilations} (target 1 per shape); XLA backend compiles per "
        f"generation: {per_generation}")


if __name__ == "__main__":
  main()
