"""LongRoPE evolutionary search: genome operators, seeds, fitness, determinism, resume, compile count, stages.

Fitness references are computed here from full logits (model.logits + log_softmax), independent of
lrjax.evaluate / lrjax.loss; seed factors are checked against the closed forms and the paper's worked numbers.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from configs import search as search_configs
from lrjax import factors, model, rope, search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every XLA backend compilation in this process (jax's own monitoring event).
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if event.endswith("backend_compile_duration") else None)

TINY = model.ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=32, block_q=64, block_k=64)
TARGET = 128


def tiny_setup(n_docs=3, doc_len=200):
  """A random tiny model (8 rotary pairs, window 32) and random documents; deterministic."""
  params = model.init_params(TINY, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, doc_len + 7 * i) for i in range(n_docs)]
  return TINY, params, docs


def tiny_config(iterations=3):
  c = search_configs.get_config("tiny")
  c.progress = False
  s = c.search
  s.target_length = TARGET
  s.population, s.mutations, s.crossovers, s.parents, s.iterations = 8, 3, 3, 4, iterations
  s.candidates_per_call, s.doc_batch = 4, 2
  c.data.num_documents = 3
  return c


@pytest.fixture(scope="module")
def tiny():
  return tiny_setup()


_logits = jax.jit(model.logits, static_argnums=0)


def reference_ppl(config, params, windows, rope_arrays, weights=None):
  """exp(mean over windows of per-window mean NLL) from full logits; weights token-aligned [N, L]."""
  n, t = windows.shape
  positions = jnp.broadcast_to(jnp.arange(t), (n, t))
  logits = _logits(config, params, jnp.asarray(windows), positions, jax.tree.map(jnp.asarray, rope_arrays))
  logp = np.asarray(jax.nn.log_softmax(logits[:, :-1]), np.float64)
  nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)[..., 0]
  w = np.ones_like(nll) if weights is None else np.asarray(weights, np.float64)[:, 1:]
  return math.exp(np.mean((nll * w).sum(1) / w.sum(1)))


# ----------------------------------------------------------------------------------------------------------
# Genome operators: property tests.


@st.composite
def spaces_and_genomes(draw):
  n_freqs = draw(st.integers(1, 10))
  cds = tuple(sorted(draw(st.sets(st.integers(0, n_freqs - 1), min_size=1, max_size=4))))
  step = draw(st.sampled_from([0.01, 0.05, 0.25]))
  lo = draw(st.sampled_from([1.0, 1.5, 4.0]))
  width = draw(st.sampled_from([0.0, 0.03, 1.0, 7.0]))
  n_hats = tuple(sorted(draw(st.sets(st.sampled_from(search.PAPER_N_HAT_CHOICES), min_size=1, max_size=5))))
  temps = tuple(draw(st.lists(st.sampled_from([1.0, 1.05, 1.1, 1.2]), min_size=1, max_size=3, unique=True)))
  space = search.SearchSpace(n_freqs=n_freqs, factor_min=lo, factor_max=lo + width, step=step,
                             critical_dims=cds, n_hat_choices=n_hats, temperatures=temps)
  def genome():
    c_index = draw(st.integers(0, len(cds) - 1))
    cd = cds[c_index]
    ticks = sorted(draw(st.lists(st.integers(0, space.max_ticks), min_size=n_freqs - cd, max_size=n_freqs - cd)))
    return np.array([0] * cd + ticks + [draw(st.integers(0, len(n_hats) - 1)), draw(st.integers(0, len(temps) - 1)),
                                        c_index], np.int64)
  return space, genome(), genome(), draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.05, 0.3, 1.0]))


def assert_valid_child(space, child):
  assert search.is_valid(space, child)
  lam = search.searched_factors(space, child)
  assert np.all(lam >= space.factor_min - 1e-9) and np.all(lam <= space.factor_max + 1e-9)
  assert np.all(np.diff(lam) >= 0)
  on_grid = (lam - space.factor_min) / space.step
  np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-6)
  full = search.genome_factors(space, child)
  assert full.shape == (space.n_freqs,) and np.all(np.diff(full) >= -1e-12) and full[0] >= 1 - 1e-12
  cd = search.genome_cd(space, child)
  assert cd in space.critical_dims and np.all(child[:cd] == 0)   # canonical below the critical dimension
  np.testing.assert_allclose(full[:cd], full[cd] ** (np.arange(cd) / cd), rtol=1e-12)
  assert search.genome_n_hat(space, child) in space.n_hat_choices
  assert search.genome_temperature(space, child) in space.temperatures


@settings(max_examples=300, deadline=None)
@given(spaces_and_genomes())
def test_mutation_returns_valid_genomes(case):
  space, parent, _, seed, prob = case
  child = search.mutate(space, parent, prob, np.random.default_rng(seed), max_tries=20)
  if child is not None:
    assert_valid_child(space, child)
    assert not np.array_equal(child, parent)


@settings(max_examples=300, deadline=None)
@given(spaces_and_genomes())
def test_crossover_returns_valid_genomes(case):
  space, p1, p2, seed, prob = case
  child = search.crossover(space, p1, p2, prob, np.random.default_rng(seed), tries=20)
  if child is not None:
    assert_valid_child(space, child)
    # Every gene comes from one of the parents.
    assert np.all((child == p1) | (child == p2))


def test_operators_respect_is_new_and_explore():
  space = search.SearchSpace(n_freqs=4, factor_min=1.0, factor_max=1.03, step=0.01)
  seen = {(0, 1, 2, 3, 0, 0, 0)}
  rng = np.random.default_rng(0)
  for _ in range(500):  # mutation chains from genomes already found reach the whole space, never repeating
    parent = np.array(sorted(seen)[rng.integers(len(seen))])
    child = search.mutate(space, parent, 0.5, rng, lambda g: search.genome_key(g) not in seen, max_tries=50)
    if child is not None:
      assert search.genome_key(child) not in seen
      seen.add(search.genome_key(child))
  # Non-decreasing 4-vectors over 4 grid values: C(7, 4) = 35.
  assert len(seen) == 35


# ----------------------------------------------------------------------------------------------------------
# Seeds and search-space construction (paper shapes, no weights needed).

LLAMA2 = model.ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096)


def test_seed_factors_closed_forms():
  d, theta, s = 128, 10000.0, 64.0
  i = np.arange(d // 2)
  pi = search.method_factors("pi", s, rotary_dim=d, theta=theta, original_length=4096)
  np.testing.assert_allclose(pi, s, rtol=1e-6)
  ntk = search.method_factors("ntk", s, rotary_dim=d, theta=theta, original_length=4096)
  np.testing.assert_allclose(ntk, s ** (2 * i / (d - 2)), rtol=2e-5)  # paper: λ_i = s^(2i/(d-2))
  # The official LongRoPE seed, linear in λ; worked values for LLaMA2-7B at 64x (the official
  # dim_mono_n_yarn_64x.csv): ones up to i = 20, 3.4231 at i = 21, +63/26 per pair, 64 from i = 46.
  yarn = search.method_factors("yarn", s, rotary_dim=d, theta=theta, original_length=4096)
  assert np.all(yarn[:21] == 1) and np.all(yarn[46:] == 64.0)
  assert yarn[21] == pytest.approx(3.4231, abs=5e-5) and yarn[33] == pytest.approx(1 + 13 * 63 / 26, abs=1e-9)
  np.testing.assert_allclose(np.diff(yarn[20:47]), 63 / 26, rtol=1e-12)
  # The named alternative inverts transformers' frequency blend instead: far smaller mid-ramp factors.
  yarn_hf = search.method_factors("yarn_hf", s, rotary_dim=d, theta=theta, original_length=4096)
  ramp = np.clip((i - 20) / 26, 0, 1)
  np.testing.assert_allclose(yarn_hf, 1 / (ramp / s + (1 - ramp)), rtol=1e-12)
  assert yarn_hf[33] == pytest.approx(1.9692, abs=1e-3) and yarn[33] == pytest.approx(32.5, abs=1e-9)
  # Mistral-7B (β 128/2) and Llama-3-8B ramps (reference notes: (11, 41) and (18, 35)).
  mis = search.method_factors("yarn", 32.0, rotary_dim=128, theta=1e4, original_length=4096, beta_fast=128,
                              beta_slow=2)
  assert np.all(mis[:12] == 1) and mis[12] > 1 and mis[40] < 32 and np.all(mis[41:] == 32)
  l3 = search.method_factors("yarn", 16.0, rotary_dim=128, theta=5e5, original_length=8192)
  assert np.all(l3[:19] == 1) and l3[19] > 1 and l3[34] < 16 and np.all(l3[35:] == 16)


def test_critical_dimension_matches_longrope2():
  assert search.critical_dimension(96, 10000.0, 2048) == 31      # Phi3-mini (LongRoPE2 §2)
  assert search.critical_dimension(128, 500000.0, 8192) == 35    # LLaMA3-8B
  # Lower end of the searched range (10 full periods in the window): 19 and 24 (LongRoPE2 App. B).
  assert search.critical_dimension(96, 10000.0, 2048, periods=10) == 19
  assert search.critical_dimension(128, 500000.0, 8192, periods=10) == 24


@pytest.mark.parametrize("variant", ["llama2_128k", "llama2_256k", "mistral_128k", "mistral_256k"])
def test_paper_configs_build(variant):
  c = search_configs.get_config(variant)
  search.validate_config(c)
  mc = LLAMA2.replace(max_position_embeddings=32768) if variant.startswith("mistral") else LLAMA2
  plan = search.make_plan(c.search, mc, target_length=c.search.target_length)
  s = c.search.target_length / 4096
  assert plan.space.factor_min == 1.0 and plan.space.factor_max == pytest.approx(1.25 * s)
  assert plan.space.genome_size == 64 + 3 and plan.space.critical_dims == (0,)
  assert plan.space.n_hat_choices == search.PAPER_N_HAT_CHOICES
  assert plan.evolution == search.Evolution()     # 64 / 16 / 16 / 32 / 0.3 / 40
  assert set(plan.seeds) == {"pi", "ntk", "yarn"}
  yarn = search.genome_factors(plan.space, plan.seeds["yarn"])
  edges = (11, 41) if variant.startswith("mistral") else (20, 46)  # official seed ramps (β 128/2 vs 32/1)
  assert np.all(yarn[:edges[0] + 1] == 1) and np.all(yarn[edges[1]:] == s) and yarn[edges[0] + 1] > 1
  assert plan.space.temperatures == (pytest.approx(math.sqrt(1 + math.log(s) / math.log(4096))),)


def test_paper_second_stage_and_short_configs_build():
  c = search_configs.get_config("llama2_2048k")
  search.validate_config(c)
  base = np.linspace(1, 64, 64)
  plan = search.make_plan(c.search, LLAMA2, target_length=c.search.target_length, stage="second",
                          base=_longrope(base, 64.0, 4096), base_length=c.base_length)
  assert plan.scale == 8 and plan.space.factor_max == 10          # relative [1, 1.25 * 8]
  assert (plan.evolution.population, plan.evolution.mutations, plan.evolution.parents) == (32, 8, 16)
  genome = plan.seeds["pi"]
  np.testing.assert_allclose(search.genome_factors(plan.space, genome), base * 8)   # saved as the product
  # Temperature against the original 4096 (s = 512 -> 1.3229), not against the fine-tuning length.
  assert plan.scaling(genome).attention_factor == pytest.approx(1.32288, abs=1e-5)
  c = search_configs.get_config("llama2_short")
  search.validate_config(c)
  plan = search.make_plan(c.search, LLAMA2, target_length=4096, stage="short", base=_longrope(base, 32.0, 4096),
                          base_length=c.base_length)
  assert plan.space.factor_max == 8.0 and "base" in plan.seeds
  np.testing.assert_allclose(search.genome_factors(plan.space, plan.seeds["base"]), np.minimum(base, 8),
                             atol=0.005)


def _longrope(long_factor, factor, original, **kw):
  return rope.RopeScaling(method="longrope", factor=factor, original_max_position_embeddings=original,
                          long_factor=long_factor, **kw)


def test_longrope2_critical_dim_is_searched():
  c = search_configs.get_config("tiny_longrope2")
  mc = model.ModelConfig(head_dim=64, max_position_embeddings=256)
  plan = search.make_plan(c.search, mc, target_length=2048)
  # d_tcd^10 = ceil(32 log_1e4(256 / 20π)) = 5 .. d_tcd = ceil(32 log_1e4(256 / 2π)) = 13, by hand.
  assert plan.space.critical_dims == tuple(range(5, 14))
  assert plan.space.factor_min == 8 and plan.space.factor_max == 16      # [s, 2s]
  # LongRoPE2's initialisation: one seed per candidate cd, λ[cd:] = an integer s in [8, 16], NTK below.
  critical = {k: g for k, g in plan.seeds.items() if k.startswith("critical")}
  assert sorted(search.genome_cd(plan.space, g) for g in critical.values()) == list(range(5, 14))
  for g in critical.values():
    cd = search.genome_cd(plan.space, g)
    lam = search.genome_factors(plan.space, g)
    assert len(set(lam[cd:])) == 1 and lam[cd] in range(8, 17)
    np.testing.assert_allclose(lam[:cd], lam[cd] ** (np.arange(cd) / cd), rtol=1e-12)
  # Mutation moves the critical dimension (not only the factors above it), keeping the genome valid.
  rng = np.random.default_rng(1)
  g, seen = plan.seeds["pi"], set()
  for _ in range(200):
    g = search.mutate(plan.space, g, 0.3, rng)
    seen.add(search.genome_cd(plan.space, g))
    assert search.is_valid(plan.space, g)
  assert len(seen) >= 5


# ----------------------------------------------------------------------------------------------------------
# Fitness.


def test_parallel_fitness_equals_one_by_one_and_reference(tiny):
  mc, params, docs = tiny
  c = tiny_config()
  c.search.search_temperature = True
  plan = search.make_plan(c.search, mc, target_length=TARGET)
  rng = np.random.default_rng(3)
  genomes = [plan.seeds["pi"], plan.seeds["yarn"]]
  while len(genomes) < 6:   # 6 candidates: the last chunk of 4 is padded
    genomes.append(search.mutate(plan.space, genomes[-1], 0.6, rng))
  assert len({search.genome_n_hat(plan.space, g) for g in genomes}) > 1
  ropes = [plan.rope_arrays(g) for g in genomes]
  windows = search.truncate_windows(docs, TARGET)
  parallel = search.PerplexityFitness(mc, params, windows, candidates_per_call=4, doc_batch=2)(ropes)
  single = search.PerplexityFitness(mc, params, windows, candidates_per_call=1, doc_batch=1)(ropes)
  np.testing.assert_allclose(parallel, single, rtol=2e-6)
  for g, r, p in zip(genomes, ropes, parallel):
    assert p == pytest.approx(reference_ppl(mc, params, windows, r), rel=1e-5)
  # Candidates sharded over the 8 simulated devices give the same numbers.
  mesh = jax.make_mesh((8,), ("data",))
  sharded = search.PerplexityFitness(mc, params, windows, candidates_per_call=8, doc_batch=3, mesh=mesh)(ropes)
  np.testing.assert_allclose(sharded, single, rtol=2e-6)


def test_needle_windows_and_fitness(tiny):
  mc, params, docs = tiny
  encode = lambda text: np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  long_docs = [np.concatenate([d, d]) for d in docs]
  windows, mask = search.needle_windows(long_docs, 384, encode, seed=5)
  assert windows.shape == (3, 384) and mask.shape == (3, 384)
  numbers = set()
  for row, m, doc in zip(windows, mask, long_docs):
    text = bytes(row.astype(np.uint8).tolist()).decode("latin-1")
    assert text.startswith("A special magic number is hidden within the following text.")
    number = text.split("One of the special magic numbers for numerous-kite is: ")[1][:7]
    numbers.add(number)
    answer = bytes(row[m == 1].astype(np.uint8).tolist()).decode()
    assert answer == f" {number}."
    assert text.endswith("What is the special magic number for numerous-kite mentioned in the provided text? "
                         "The special magic number for numerous-kite mentioned in the provided text is" + answer)
    assert np.flatnonzero(m).min() == 384 - len(answer)
    assert bytes(doc[:20].astype(np.uint8).tolist()).decode("latin-1") in text
  assert len(numbers) == 3
  # With a BOS id the window keeps it first and drops the document's own.
  bos_docs = [np.concatenate([[7], d]) for d in long_docs]
  with_bos, _ = search.needle_windows(bos_docs, 384, encode, bos_id=7, seed=5)
  assert np.all(with_bos[:, 0] == 7) and np.array_equal(with_bos[:, 1:20], windows[:, :19])
  plan = search.make_plan(tiny_config().search, mc, target_length=384)
  rope_arrays = plan.rope_arrays(plan.seeds["ntk"])
  got = search.PerplexityFitness(mc, params, windows, mask, candidates_per_call=2)([rope_arrays])
  assert got[0] == pytest.approx(reference_ppl(mc, params, windows, rope_arrays, mask), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The search: determinism, compile count, resume.


def test_no_compilation_after_first_generation(tiny, tmp_path):
  mc, params, docs = tiny
  c = tiny_config(iterations=3)
  plan = search.make_plan(c.search, mc, target_length=TARGET)
  # candidates_per_call=5 is used by no other test, so this search's first generation really compiles.
  fitness = search.PerplexityFitness(mc, params, search.truncate_windows(docs, TARGET), candidates_per_call=5,
                                     doc_batch=2)
  compiles_per_call = []

  def fitness_fn(genomes):
    before = len(_COMPILES)
    out = fitness([plan.rope_arrays(g) for g in genomes])
    compiles_per_call.append(len(_COMPILES) - before)
    return out

  result = search.evolve(plan.space, plan.evolution, plan.seeds, fitness_fn, rng=np.random.default_rng(0))
  assert len(compiles_per_call) == 4 and result.generations == 4
  assert compiles_per_call[0] >= 1 and compiles_per_call[1:] == [0, 0, 0]
  assert fitness.compilations == 1


def test_same_seed_same_result_and_outputs(tiny, tmp_path):
  mc, params, docs = tiny
  c = tiny_config(iterations=3)
  a = search.run(c, mc, params, docs, str(tmp_path / "a"))
  b = search.run(c, mc, params, docs, str(tmp_path / "b"))
  # One compilation for the whole search (none for the second: same shapes, shared program).
  assert a.fitness == b.fitness and a.scaling == b.scaling and a.compilations <= 1 and b.compilations == 0
  assert [r["best_fitness"] for r in a.evolution.log] == [r["best_fitness"] for r in b.evolution.log]
  # Every seed's recorded fitness is its perplexity computed independently from full logits.
  windows = search.truncate_windows(docs, TARGET)
  for name, genome in a.plan.seeds.items():
    assert a.seed_fitness[name] == pytest.approx(reference_ppl(mc, params, windows, a.plan.rope_arrays(genome)),
                                                 rel=1e-5), name
  assert a.evolution.evaluations == 8 + 3 * 6
  best = np.asarray(a.scaling.long_factor)
  assert np.all(np.diff(best) >= 0) and best.min() >= 1 and best.max() <= 1.25 * TARGET / 32 + 1e-9
  wd = tmp_path / "a"
  loaded = factors.load(wd / "factors.json", n_layers=2, rotary_dim=16)
  assert loaded == a.scaling
  np.testing.assert_allclose(factors.load(wd / "factors.csv").long_factor, best)
  hf = json.loads((wd / "rope_scaling_hf.json").read_text())
  assert hf["rope_scaling"]["long_factor"] == pytest.approx(list(best))
  assert hf["original_max_position_embeddings"] == 32 and hf["max_position_embeddings"] == TARGET
  rows = (wd / "generations.csv").read_text().splitlines()
  assert rows[0] == "generation,best_fitness,mean_fitness,evaluations,total_evaluations,seconds" and len(rows) == 5
  assert (wd / "factors.png").stat().st_size > 1000 and (wd / "fitness.png").stat().st_size > 1000
  # The result reproduces its recorded fitness when evaluated on its own.
  ppl = reference_ppl(mc, params, search.truncate_windows(docs, TARGET),
                      rope.rope_arrays(a.scaling, dim=16, theta=10000.0, n_layers=2))
  assert ppl == pytest.approx(a.fitness, rel=1e-5)
  # A finished search resumes to the same result without evaluating anything.
  c.resume = True
  again = search.run(c, mc, params, docs, str(wd))
  assert again.scaling == a.scaling and again.compilations == 0
  # Resumed with more iterations it runs the extra generations, ending where a 5-iteration run ends.
  c.search.iterations = 5
  extended = search.run(c, mc, params, docs, str(wd))
  c.resume = False
  fresh = search.run(c, mc, params, docs, str(tmp_path / "five"))
  assert extended.evolution.generations == 6 and extended.scaling == fresh.scaling
  assert extended.evolution.log[:4] == a.evolution.log
  assert [r["best_fitness"] for r in extended.evolution.log] == [r["best_fitness"] for r in fresh.evolution.log]
  with pytest.raises(search.SearchError, match="already holds a search state"):
    search.run(c, mc, params, docs, str(wd))


def test_early_stop():
  space = search.SearchSpace(n_freqs=3, factor_min=1.0, factor_max=2.0)
  evo = search.Evolution(population=6, mutations=2, crossovers=2, parents=3, iterations=30,
                         early_stop_patience=2, early_stop_tol=1e9)
  seeds = {"a": np.array([0, 0, 0, 0, 0, 0])}
  r = search.evolve(space, evo, seeds, lambda gs: np.array([float(g[:3].sum()) for g in gs]),
                    rng=np.random.default_rng(0))
  assert r.stopped_early and r.generations == 3


_RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from lrjax import search
    from tests.test_search import tiny_config, tiny_setup
    call = search.PerplexityFitness.__call__
    def slowed(self, ropes):  # make each generation long enough to be killed in the middle of it
      time.sleep(0.2)
      return call(self, ropes)
    search.PerplexityFitness.__call__ = slowed
    c = tiny_config(iterations=7)
    c.resume = sys.argv[2] == "1"
    mc, params, docs = tiny_setup()
    r = search.run(c, mc, params, docs, sys.argv[1])
    print(json.dumps({"fitness": r.fitness, "factors": list(r.scaling.long_factor), "n_hat": r.scaling.n_hat}))
""")


def _generation(state_path):
  try:
    with open(state_path) as f:
      return json.load(f)["generation"]
  except (OSError, ValueError):
    return -1


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  """An uninterrupted run vs one killed twice (mid-generation) and resumed, each in a fresh process."""
  script = tmp_path / "resume_script.py"
  script.write_text(_RESUME_SCRIPT)
  # A persistent compilation cache only saves the later processes' compile time.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  launch = lambda wd, resume: subprocess.Popen([sys.executable, str(script), str(wd), str(resume)], cwd=ROOT,
                                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ref = launch(tmp_path / "reference", 0)
  ref_out, ref_err = ref.communicate(timeout=300)
  assert ref.returncode == 0, ref_err[-2000:]
  wd = tmp_path / "killed"
  state = wd / search.STATE_FILE
  kills = []
  for resume, kill_after_generation, delay in ((0, 2, 0.1), (1, 5, 0.05)):
    proc = launch(wd, resume)
    deadline = time.time() + 120
    while _generation(state) < kill_after_generation and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append(_generation(state))
  assert kills[-1] < 7, f"the run finished before it could be killed: {kills}"
  final = launch(wd, 1)
  out, err = final.communicate(timeout=300)
  assert final.returncode == 0, err[-2000:]
  assert json.loads(out.strip().splitlines()[-1]) == json.loads(ref_out.strip().splitlines()[-1])
  got, want = (json.loads((d / search.STATE_FILE).read_text()) for d in (wd, tmp_path / "reference"))
  for key in ("population", "cache", "rng", "generation"):
    assert got[key] == want[key], key
  strip = lambda log: [{k: v for k, v in row.items() if k != "seconds"} for row in log]
  assert strip(got["log"]) == strip(want["log"])


# ----------------------------------------------------------------------------------------------------------
# Progressive second stage and short-context recovery on the tiny model.


def test_second_stage_multiplies_base_factors(tiny, tmp_path):
  mc, params, docs = tiny
  c = tiny_config(iterations=1)
  c.stage = "second"
  c.base_factors, c.base_length = "base.json", 64
  c.search.target_length = TARGET
  base = np.linspace(1.0, 2.0, 8)
  r = search.run(c, mc, params, docs, str(tmp_path), base=_longrope(base, 2.0, 32))
  rel = search.searched_factors(r.plan.space, r.evolution.best)
  assert r.plan.scale == 2 and r.plan.space.factor_max == 2.5
  np.testing.assert_allclose(r.scaling.long_factor, base * rel)
  assert r.seed_fitness["pi"] == pytest.approx(reference_ppl(
      mc, params, search.truncate_windows(docs, TARGET),
      rope.rope_arrays(rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=32,
                                        long_factor=base * 2), dim=16, theta=10000.0, n_layers=2)), rel=1e-5)


def test_short_recovery_emits_buckets_and_hf_longrope(tiny, tmp_path):
  mc, params, docs = tiny
  c = search_configs.get_config("tiny_short")
  c.progress = False
  c.base_factors, c.base_length, c.short_lengths = "long.json", TARGET, (32, 64)
  c.search.original_length = 32
  s = c.search
  s.population, s.mutations, s.crossovers, s.parents, s.iterations = 6, 2, 2, 3, 1
  s.candidates_per_call, s.doc_batch = 2, 3
  long = np.linspace(1.0, 5.0, 8)
  out = search.run_short(c, mc, params, docs, str(tmp_path), base=_longrope(long, None, 32))
  scaling = out["scaling"]
  assert [n for n, _ in scaling.buckets] == [32, 64]
  assert np.max(scaling.buckets[0][1]) <= 4.0 and scaling.short_factor == out[32].scaling.long_factor
  assert rope.select_longrope_factors(scaling, 50) == out[64].scaling.long_factor
  assert rope.select_longrope_factors(scaling, 100) == tuple(long)
  assert factors.load(tmp_path / "factors.json") == scaling
  hf = json.loads((tmp_path / "rope_scaling_hf.json").read_text())
  assert hf["rope_scaling"]["rope_type"] == "longrope" and hf["original_max_position_embeddings"] == 32
  assert hf["rope_scaling"]["short_factor"] == pytest.approx(list(out[32].scaling.long_factor))
  assert hf["rope_scaling"]["long_factor"] == pytest.approx(list(long))
  assert hf["rope_scaling"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line.


def test_bad_inputs_raise_clear_errors(tiny, tmp_path):
  mc, params, docs = tiny
  c = tiny_config()
  with pytest.raises(search.SearchError, match="shorter than the model's original window 32"):
    search.make_plan(c.search, mc, target_length=16)
  with pytest.raises(search.SearchError, match=r"document 0 has 200 tokens, shorter than the target length 256"):
    c2 = tiny_config()
    c2.search.target_length = 256
    search.run(c2, mc, params, docs, str(tmp_path / "short_docs"))
  with pytest.raises(search.SearchError, match="base factors have 7 values per row; the model has 8"):
    search.make_plan(c.search, mc, target_length=TARGET, stage="second", base=_longrope(np.ones(7), 2.0, 32),
                     base_length=64)
  c.search.population = 3
  with pytest.raises(search.SearchError, match="population 3 is smaller than the 4 parents"):
    search.validate_config(c)
  c = tiny_config()
  c.search.bogus = 1
  with pytest.raises(search.SearchError, match=r"unknown config key config\.search\.bogus \(nothing reads it\)"):
    search.validate_config(c)
  c = tiny_config()
  c.base_factors = "x.json"
  with pytest.raises(search.SearchError, match="only used by the 'second' and 'short' stages"):
    search.validate_config(c)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny):
  from lrjax import weights
  mc, params, _ = tiny
  path = tmp_path_factory.mktemp("ckpt") / "tiny_hf"
  weights.save_hf(path, mc, jax.tree.map(np.asarray, params))
  return path


def _experiment(args, tmp_path):
  return subprocess.run([sys.executable, "experiments/search.py", *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)


def test_experiment_prints_one_line_for_bad_input(tmp_path, tiny_checkpoint):
  bad = tmp_path / "bad.csv"
  bad.write_text("1.0\n1.5\n2.0\n")   # 3 factors for an 8-frequency model
  cli_cases = [
      (["--config=configs/search.py:tiny", "--config.search.population=8", "--config.search.parents=16"],
       "population 8 is smaller than the 16 parents"),
      (["--config=configs/search.py:tiny_second", f"--config.base_factors={bad}", f"--config.model={tiny_checkpoint}",
        "--config.base_length=64", "--config.search.target_length=128", "--config.data.num_documents=2",
        "--config.search.original_length=32"],
       "bad.csv: long_factor has 3 factors but rotary_dim/2 = 8"),
  ]
  for args, message in cli_cases:
    out = _experiment([*args, f"--workdir={tmp_path / 'wd'}"], tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and message in lines[0], out.stderr[-1500:]
  # The same entry point in-process (experiments/search.py prints exactly str(error)).
  def config(**search_kw):
    c = search_configs.get_config("tiny")
    c.model, c.data.num_documents, c.search.original_length = str(tiny_checkpoint), 2, 32
    c.search.update(search_kw)
    return c
  library_cases = [
      (dict(c=config(target_length=128), model="/nonexistent"), "/nonexistent does not exist"),
      (dict(c=config(target_length=16)), "target length 16 is shorter than the model's original window 32"),
      (dict(c=config(target_length=128), num_documents=99),
       "builtin:valid has only 16 documents of at least 128 tokens; 99 requested"),
  ]
  for case, message in library_cases:
    c = case["c"]
    c.model = case.get("model", c.model)
    c.data.num_documents = case.get("num_documents", c.data.num_documents)
    with pytest.raises(ValueError, match=message) as info:
      search.main(c, str(tmp_path / "wd"))
    assert "\n" not in str(info.value)
  assert not (tmp_path / "wd" / search.STATE_FILE).exists()


def test_experiment_end_to_end(tmp_path, tiny_checkpoint):
  """The CLI on a tiny checkpoint and builtin:valid: outputs written, resume of a finished search is a no-op."""
  args = ["--config=configs/search.py:tiny", f"--config.model={tiny_checkpoint}", "--config.progress=False",
          "--config.data.num_documents=2", "--config.search.target_length=128", "--config.search.iterations=1",
          "--config.search.population=6", "--config.search.parents=3", "--config.search.mutations=2",
          "--config.search.crossovers=2", "--config.search.candidates_per_call=2", "--config.search.doc_batch=2",
          f"--workdir={tmp_path}"]
  out = _experiment(args, tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "1 compilation(s)" in out.stdout and "10 evaluations" in out.stdout
  for name in ("factors.json", "factors.csv", "rope_scaling_hf.json", "generations.csv", "summary.json",
               "factors.png", "fitness.png", search.STATE_FILE):
    assert (tmp_path / name).exists(), name
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["num_documents"] == 2 and summary["target_length"] == 128 and summary["compilations"] == 1
  assert summary["documents"]["source"] == "builtin:valid" and len(summary["documents"]["indices"]) == 2
  out = _experiment(args + ["--config.resume=True"], tmp_path)
  assert out.returncode == 0 and "0 compilation(s)" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# Quality on the built-in model (needs lrjax/assets/model; fails, never skips, when it is missing).


def test_search_on_builtin_model_beats_its_best_seed_on_held_out_documents(tmp_path):
  from lrjax import data, tokenizers, weights
  assert os.path.isdir(weights.BUILTIN_MODEL), (
      f"built-in model missing at {weights.BUILTIN_MODEL}: this quality test needs the committed pretrained model")
  mc, params = weights.load(weights.BUILTIN_MODEL)
  target = 8 * mc.max_position_embeddings       # 8x the 256-token window
  tokenizer = tokenizers.load_tokenizer("byte")
  valid = data.tokenized_documents("builtin:valid", tokenizer, min_tokens=target, max_documents=2)
  test = data.tokenized_documents("builtin:test", tokenizer, min_tokens=target, max_documents=4)
  c = search_configs.get_config("tiny")
  c.progress = False
  s = c.search
  s.population, s.mutations, s.crossovers, s.parents, s.iterations = 8, 4, 4, 4, 3
  s.candidates_per_call, s.doc_batch = 1, 2
  # The paper's seeds plus transformers' YaRN frequencies (yarn_hf): with this small budget the official
  # linear-in-λ YaRN seed alone starts too far from exact YaRN (10.2 vs 8.1 on the held-out documents).
  s.seeds = ("pi", "ntk", "yarn", "yarn_hf")
  result = search.run(c, mc, params, valid, str(tmp_path))
  assert result.fitness < min(result.seed_fitness.values())
  # Held-out builtin:test windows: the searched setting vs its seeds as the search evaluated them (grid-snapped
  # factors, n̂ = 0, su temperature) and vs the exact methods with their own attention factors.
  fitness = search.PerplexityFitness(mc, params, search.truncate_windows(test, target), candidates_per_call=1,
                                     doc_batch=2)
  exact = [rope.RopeScaling(method=m, factor=8.0, original_max_position_embeddings=mc.max_position_embeddings)
           for m in ("linear", "ntk", "yarn")]
  arrays = ([mc.rope_arrays(result.scaling, seq_len=target)]
            + [result.plan.rope_arrays(g) for g in result.plan.seeds.values()]
            + [mc.rope_arrays(scaling, seq_len=target) for scaling in exact])
  searched, *others = fitness(arrays)
  names = [f"seed {n}" for n in result.plan.seeds] + ["exact PI", "exact NTK", "exact YaRN"]
  assert searched < min(others), dict(searched=searched, **dict(zip(names, others)))


# ----------------------------------------------------------------------------------------------------------
# The whole setting (factors and n̂) through every stage; fitness documents sampled as the paper does.


def test_n_hat_survives_every_stage(tiny, tmp_path):
  """A first-stage result with n̂ = 8: the second stage, short recovery and fine-tuning keep it; HF export
  refuses to drop it silently."""
  from lrjax import train, weights
  mc, params, docs = tiny
  first = _longrope(np.linspace(1.0, 2.0, 8), 2.0, 32, n_hat=8)
  path = tmp_path / "first.json"
  factors.save(path, first, target_length=64)
  c = tiny_config(iterations=1)
  c.stage, c.base_factors, c.base_length = "second", str(path), 64
  c.search.search_n_hat = False
  base = search.load_base(c, mc)
  assert base.n_hat == 8
  second = search.run(c, mc, params, docs, str(tmp_path / "second"), base=base)
  assert second.scaling.n_hat == 8 and factors.load(tmp_path / "second" / "factors.json").n_hat == 8
  assert int(second.plan.rope_arrays(second.evolution.best).n_hat) == 8
  short = search_configs.get_config("tiny_short")
  short.progress, short.base_factors, short.base_length, short.short_lengths = False, str(path), 64, (32,)
  short.search.original_length = 32
  short.search.update(population=4, mutations=1, crossovers=1, parents=2, iterations=1, candidates_per_call=2)
  recovered = search.run_short(short, mc, params, docs, str(tmp_path / "short"), base=base)["scaling"]
  assert recovered.n_hat == 8 and np.allclose(recovered.long_factor, first.long_factor)
  stage = train.stage_rope({"length": 64, "rope": str(path)}, mc)
  assert int(mc.rope_arrays(stage, seq_len=64).n_hat) == 8
  with pytest.raises(weights.WeightsError, match=r"n_hat=8 cannot be expressed in an HF config"):
    weights.save_hf(tmp_path / "hf", mc, jax.tree.map(np.asarray, params), rope_scaling=second.scaling)


def test_fitness_documents_are_sampled_and_recorded():
  from lrjax import data, tokenizers
  tok = tokenizers.load_tokenizer("byte")
  every = data.tokenized_documents("builtin:valid", tok, min_tokens=1024)
  c = search_configs.get_config("tiny")
  c.data.num_documents = 3
  chosen = []
  for seed in range(6):
    c.search.seed = seed
    docs, info = search.fitness_documents(c, tok, 1024)
    assert info["qualifying"] == len(every) and len(set(info["indices"])) == 3
    assert [d.tolist() for d in docs] == [every[i].tolist() for i in info["indices"]]
    chosen.append(tuple(info["indices"]))
  assert len(set(chosen)) > 1 and set(chosen) != {(0, 1, 2)}        # random, and the seed matters
  c.search.seed = 0
  assert search.fitness_documents(c, tok, 1024)[1]["indices"] == list(chosen[0])   # deterministic
  c.data.sample_documents = False
  assert search.fitness_documents(c, tok, 1024)[1]["indices"] == [0, 1, 2]
