"""Every path lrjax reads or writes, on a non-local filesystem: gs:// served from memory (lrjax.testing.fake_gcs),
reached by epath through fsspec and by orbax's arrays through tensorstore's GCS driver over HTTP, as a real bucket
is. Factor files; prepare -> stream; a fine-tuning run (checkpoints, resume, metrics, TensorBoard, loss plot, HF
export), an evaluation and a search (state, resume, outputs), each against the same run on local disk. The tests run in an empty directory, so a
gs:// path mishandled as a local one ("gs:/bucket/...") would show up there."""

import csv
import io
import json
import os

import jax
import numpy as np
import pytest
from etils import epath

from configs import evaluate as evaluate_configs
from configs import pretrain
from configs import search as search_configs
from lrjax import evaluate, factors, model, records, rope, search, stream, testing, train


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with testing.fake_gcs() as fs:
    yield fs
  assert not os.listdir(cwd), f"written to local disk instead of gs://: {os.listdir(cwd)}"


def _text_corpus(root: epath.Path, n: int = 40) -> str:
  """n documents of 20..200 bytes as a jsonl file under `root`; returns its path."""
  rng = np.random.default_rng(0)
  path = root / "docs.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"text": "".join(rng.choice(list("abcdefgh \n"), rng.integers(20, 200)))})
                          + "\n" for _ in range(n)))
  return os.fspath(path)


def test_factor_files(gcs):
  scaling = rope.RopeScaling(method="longrope", long_factor=np.linspace(1.0, 8.0, 8), factor=4.0,
                             original_max_position_embeddings=64)
  factors.save("gs://bucket/f/factors.json", scaling, {"seed": 3}, target_length=256)
  factors.save_csv("gs://bucket/f/official.csv", np.linspace(1.0, 8.0, 8))
  ff = factors.read("gs://bucket/f/factors.json", rotary_dim=16)
  assert ff.target_length == 256 and ff.provenance["seed"] == 3
  np.testing.assert_array_equal(ff.scaling.long_factor, scaling.long_factor)
  csv_scaling = factors.resolve_file("gs://bucket/f/official.csv", original_length=64, target_length=256)
  assert csv_scaling.factor == 4.0
  np.testing.assert_array_equal(csv_scaling.long_factor, scaling.long_factor)
  assert factors.read("gs://bucket/f/official.csv").provenance == {"source": "official.csv"}
  with pytest.raises(factors.FactorFileError, match=r"gs://bucket/f/missing.json: cannot read factor file") as e:
    factors.read("gs://bucket/f/missing.json")
  assert "\n" not in str(e.value)


def _run_config(data: str, steps: int):
  c = pretrain.get_config("tiny")
  c.data.source = data
  c.stages[0].update(steps=steps, warmup_steps=0, schedule="constant")
  c.checkpoint_every = 2
  return c


def _losses(workdir: str) -> list[str]:
  return [r["loss"] for r in csv.DictReader(io.StringIO(epath.Path(workdir, "metrics.csv").read_text()))]


def test_prepare_train_resume_export(gcs, tmp_path):
  source = _text_corpus(epath.Path("gs://bucket/raw"))
  records.prepare(source, "gs://bucket/records", shard_documents=16, progress=False)
  batches = list(stream.batches([stream.Component(records.Records("gs://bucket/records", tokenizer="byte"))],
                                length=64, global_batch=2, seed=0, num_epochs=1))
  texts = [json.loads(line)["text"] for line in epath.Path(source).read_text().splitlines()]
  assert sum(int((b["weights"] > 0).sum()) for b in batches) == sum(len(t) + 1 for t in texts) - 1

  # 4 steps on gs:// (checkpoints at 2 and 4), then resumed there to 6 with an export; the same 6 steps locally.
  lines = []
  train.train(_run_config("gs://bucket/records", 4), "gs://bucket/run", report=lines.append, progress=False)
  remote = _run_config("gs://bucket/records", 6)
  remote.export_hf = "gs://bucket/export"
  out = train.train(remote, "gs://bucket/run", report=lines.append, progress=False)
  assert "resumed from gs://bucket/run/checkpoints/4" in lines and out["step"] == 6
  local = _run_config("gs://bucket/records", 6)
  local.export_hf = str(tmp_path / "export")
  train.train(local, str(tmp_path / "run"), report=lambda _: None, progress=False)

  assert _losses("gs://bucket/run") == _losses(str(tmp_path / "run"))  # bitwise (repr floats)
  run = epath.Path("gs://bucket/run")
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
  assert [p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir()] == [True, True]
  assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for name in ("config.json", "model.safetensors"):
    assert epath.Path("gs://bucket/export", name).read_bytes() == (tmp_path / "export" / name).read_bytes(), name


def test_evaluate_writes_its_outputs(gcs, tmp_path):
  model = testing.save_tiny_hf(tmp_path / "model")
  factors.save("gs://bucket/f/factors.json", rope.RopeScaling(method="longrope", long_factor=np.linspace(1, 4, 8),
                                                              factor=2.0, original_max_position_embeddings=64))
  c = evaluate_configs.get_config()
  c.update(model=model, tokenizer="byte", data=(_text_corpus(epath.Path("gs://bucket/eval_data"), 8),),
           lengths=(32, 64), settings=("none", "yarn", "gs://bucket/f/factors.json"), min_tokens=0,
           short_documents="skip", progress=False)
  out = evaluate.run(c, "gs://bucket/eval", print_fn=lambda _: None)
  ref = evaluate.run(c, str(tmp_path / "eval"), print_fn=lambda _: None)
  assert set(out["table"]) == {"none", "yarn", "f/factors.json"} and out["table"] == ref["table"]
  for name in ("results.csv", "results.json", "table.txt", "ppl.png"):
    assert epath.Path("gs://bucket/eval", name).exists(), name
  assert epath.Path("gs://bucket/eval/table.txt").read_text() == (tmp_path / "eval" / "table.txt").read_text()


def test_search_writes_and_resumes_its_state(gcs, tmp_path):
  """A search on gs:// stopped after one generation and resumed to three equals a local three-generation run."""
  cfg = testing.tiny_config()
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  docs = [np.random.default_rng(i).integers(0, 256, 140) for i in range(2)]

  def config(iterations):
    c = search_configs.get_config("tiny")
    c.progress = False
    s = c.search
    s.target_length, s.iterations = 128, iterations
    s.population, s.mutations, s.crossovers, s.parents = 6, 2, 2, 3
    c.data.num_documents = 2
    return c

  search.run(config(1), cfg, params, docs, "gs://bucket/search")
  resumed_config = config(3)
  resumed_config.resume = True
  resumed = search.run(resumed_config, cfg, params, docs, "gs://bucket/search")
  local = search.run(config(3), cfg, params, docs, str(tmp_path / "search"))
  assert resumed.fitness == local.fitness
  np.testing.assert_array_equal(resumed.scaling.long_factor, local.scaling.long_factor)
  for name in ("factors.json", "generations.csv", search.STATE_FILE, "factors.png"):
    assert epath.Path("gs://bucket/search", name).exists(), name
  best = lambda text: [row["best_fitness"] for row in csv.DictReader(io.StringIO(text))]
  assert best(epath.Path("gs://bucket/search/generations.csv").read_text()) == best(
      (tmp_path / "search" / "generations.csv").read_text())
  assert len(best((tmp_path / "search" / "generations.csv").read_text())) == 4  # generation 0 (seeds) + 3
