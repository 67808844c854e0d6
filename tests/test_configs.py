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
