"""Every shipped experiment config runs end to end on small stand-in data.

Each paper-scale config is scaled down by one ratio (its lengths, strides, length filters and the model's
original window together, so every extension ratio s stays the paper's), pointed at a random tiny model and at
stand-in documents, and run through the same entry point a user calls. A config that validates but cannot run
(a stride the protocol rejects, books shorter than a window) fails here.
"""

import json

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_configs
from lrjax import evaluate, model, weights


def tiny_model(tmp_path, window: int):
  """A random tiny byte-vocabulary LLaMA with original window `window`, saved as an HF directory."""
  cfg = model.ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, max_position_embeddings=window, block_q=64, block_k=64)
  params = jax.tree.map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(0)))
  path = tmp_path / "model"
  weights.save_hf(path, cfg, params)
  return path


def stand_in_documents(tmp_path, lengths) -> str:
  rng = np.random.default_rng(0)
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"id": f"d{i}", "text": "".join(rng.choice(list("abcdefgh \n"), n))}) + "\n"
                          for i, n in enumerate(lengths)))
  return str(path)


def scale_down(c, ratio: int):
  """Divides every length-like value of an evaluate config by `ratio`."""
  c.lengths = tuple(n // ratio for n in c.lengths)
  c.stride //= ratio
  if c.min_tokens > 0:
    c.min_tokens //= ratio
  c.max_length //= ratio
  return c


# variant: (ratio, stand-in document lengths in bytes). The paper's original window is 4096 tokens.
EVALUATE = {"": (16, None), "proofpile": (256, [600, 700, 800]), "pg19": (64, [40, 200, 300, 90]),
            "books3": (256, [8400, 9000, 8300, 10000])}


@pytest.mark.parametrize("variant", list(EVALUATE))
def test_evaluate_configs_run_end_to_end(variant, tmp_path):
  ratio, lengths = EVALUATE[variant]
  c = scale_down(evaluate_configs.get_config(variant), ratio)
  c.progress = False
  c.tokenizer = "byte"
  window = 256 // ratio if variant == "" else 4096 // ratio
  c.model = str(tiny_model(tmp_path, window))
  if lengths is not None:
    c.data = (stand_in_documents(tmp_path, lengths),)
  if c.num_documents:
    c.num_documents = min(c.num_documents, 3)
  if variant == "books3":
    c.mesh.update(data=2, sequence=4)   # ring attention over a sequence axis, as the protocol runs it
  out = evaluate.run(c, str(tmp_path / "out"))
  assert set(out["table"]) == {s.split("=")[0] for s in c.settings}
  for row in out["table"].values():
    assert sorted(row) == sorted(c.lengths) and all(np.isfinite(v) for v in row.values())
  assert (tmp_path / "out" / "ppl.png").exists()
  if variant == "pg19":  # the short book (40 bytes) is one shorter window, not an error
    assert {cell["num_documents"] for cell in out["cells"]} == {4}
  if variant == "books3":  # 3 random books; windows start every 1024 tokens (262144 / 256), disjoint at 32
    chosen = json.loads((tmp_path / "out" / "results.json").read_text())["documents"][c.data[0]]
    cell = next(cell for cell in out["cells"] if cell["length"] == 32)
    assert len(chosen) == 3 and cell["num_windows"] == sum(-(-lengths[i] // 1024) for i in chosen)
    assert cell["count"] == 31 * cell["num_windows"]


# ----------------------------------------------------------------------------------------------------------
# Search and fine-tuning: the paper configs on their own mesh shapes (8 simulated devices), scaled by 1/256.

from configs import finetune as finetune_configs  # noqa: E402
from configs import search as search_configs  # noqa: E402
from lrjax import dryrun, search, train  # noqa: E402

RATIO = 256
SEARCH = ["tiny", "tiny_longrope2", "tiny_needle", "tiny_temperature", "tiny_second", "tiny_short", "llama2_128k",
          "llama2_256k", "llama2_2048k", "llama2_short", "mistral_128k", "mistral_256k", "smollm2"]


def paper_model(tmp_path, window: int):
  """A random tiny LLaMA with head_dim 128 (64 rotary pairs, as LLaMA2-7B: the published factor tables fit)."""
  cfg = model.ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_layers=1, num_heads=1,
                          num_kv_heads=1, head_dim=128, max_position_embeddings=window)
  path = tmp_path / "paper_model"
  weights.save_hf(path, cfg, jax.tree.map(np.asarray, model.init_params(cfg, jax.random.PRNGKey(0))))
  return str(path)


def scale_search(c, ratio, tmp_path):
  s = c.search
  paper = s.original_length >= 4096 or c.model == "smollm2"
  if paper:
    window = (s.original_length or 8192) // ratio
    s.target_length //= ratio
    s.original_length = window
    c.base_length //= ratio
    c.short_lengths = tuple(n // ratio for n in c.short_lengths)
    c.block_q = c.block_k = min(c.block_q, 64)
    c.model = paper_model(tmp_path, window)
    c.data.tokenizer = "byte"
    c.data.source = "builtin:valid"
  if c.base_factors.startswith("REQUIRED") or c.base_factors.startswith("/path"):
    base = tmp_path / "base.json"
    rope_lib = __import__("lrjax.rope", fromlist=["rope"])
    from lrjax import factors
    half = 64 if paper else 32
    factors.save(base, rope_lib.RopeScaling(method="longrope", factor=float(c.base_length / (s.original_length or 256)),
                                            original_max_position_embeddings=s.original_length or 256,
                                            long_factor=np.linspace(1, 4, half)), target_length=c.base_length)
    c.base_factors = str(base)
  s.population, s.mutations, s.crossovers, s.parents, s.iterations = 8, 1, 0, 8, 0  # generation 0 only
  s.candidates_per_call = max(c.mesh.data, 1) if c.mesh.data > 1 else 1
  c.data.num_documents = min(c.data.num_documents, 2)
  c.progress = False
  return c


@pytest.mark.parametrize("variant", SEARCH)
def test_search_configs_run_on_their_mesh(variant, tmp_path):
  """One real generation of every search config on its mesh shape (ring over 8 devices for the paper ones):
  the fitness program the dry run compiles also evaluates, and the seeds' fitness is finite."""
  c = scale_search(search_configs.get_config(variant), RATIO, tmp_path)
  result = search.main(c, str(tmp_path / "out"))
  results = result if isinstance(result, dict) else {None: result}
  for r in (v for k, v in results.items() if k != "scaling"):
    assert all(np.isfinite(v) for v in r.seed_fitness.values()), r.seed_fitness
  if c.mesh.sequence > 1:
    assert search.search_mesh(c).shape["sequence"] == 8 and c.attention == "ring"


FINETUNE = ["tiny", "llama2", "llama2_v5p", "mistral", "mistral_v5p", "longrope2_mix"]


@pytest.mark.parametrize("variant", FINETUNE)
def test_finetune_configs_run_on_their_mesh(variant, tmp_path):
  """Two steps of every stage of each fine-tuning recipe, on its mesh shape (a pod layout on an 8-device slice of
  its data axis, as the dry run checks it), with the published factor tables where the recipe names them."""
  c = finetune_configs.get_config(variant)
  if variant == "tiny":  # batch 4 on one CPU device; here 8 simulated devices: 4 data rows x 2 tensor shards
    c.mesh.update(data=4, tensor=2)
  else:
    c, _ = dryrun.fit_to_devices(c, 8)
    window = 4096 // RATIO
    c.init = paper_model(tmp_path, window)
    c.model.update(vocab_size=256, hidden_size=128, intermediate_size=128, num_layers=1, num_heads=1,
                   num_kv_heads=1, head_dim=128, max_position_embeddings=window, original_max_position_embeddings=None,
                   rms_norm_eps=1e-6, rope_theta=10000.0,
                   block_q=64, block_k=64, dtype="float32", remat="none")
    c.data.tokenizer = "byte"
    if c.data.mixture:  # stand-in documents for each prepared source; its length filters scaled alike
      docs = stand_in_documents(tmp_path, [20, 30, 60, 200, 500, 700, 900, 1200])
      for m in c.data.mixture:
        m.update(path=docs, min_tokens=m["min_tokens"] // RATIO, max_tokens=m["max_tokens"] // RATIO)
      c.data.mixed_original_length //= RATIO
    else:
      c.data.source = "builtin:train"
    c.loss_chunk = 64
    for stage in c.stages:
      stage.length //= RATIO
      if stage.rope.startswith("/path"):  # the recipe's own searched factors: a stand-in file
        from lrjax import factors, rope as rope_lib
        path = tmp_path / f"factors_{stage.length}.json"
        factors.save(path, rope_lib.RopeScaling(method="longrope", long_factor=np.linspace(1, 8, 64),
                                                factor=stage.length / window,
                                                original_max_position_embeddings=window),
                     target_length=stage.length)
        stage.rope = str(path)
  for stage in c.stages:
    stage.steps, stage.warmup_steps = 2, 0
  c.checkpoint_every, c.peak_flops = 100, 1.0
  for key in ("dry_run", "device_memory_gb"):
    if key in c:
      del c[key]
  out = train.train(c, str(tmp_path / "run"), report=lambda _: None, progress=False)
  assert out["step"] == 2 * len(c.stages) and np.isfinite(out["loss"])
