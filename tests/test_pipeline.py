"""The reproduction pipeline at its smallest settings runs every step end to end on the built-in model."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import reproduce_tiny  # noqa: E402
from lrjax import pipeline  # noqa: E402


def test_smoke_reproduction_runs_every_step(tmp_path):
  config = reproduce_tiny.get_config("smoke")
  lines = []
  out = pipeline.run_pipeline(config, str(tmp_path), print_fn=lines.append)
  assert set(out["results"]) == set(pipeline.STEPS)
  saved = json.load(open(tmp_path / "results.json"))
  assert set(saved["results"]) == set(pipeline.STEPS)
  for path in ("summary.md", "eval_base/ppl.png", "eval_extended/ppl.png", "passkey_base/passkey.png",
               "search_8x/factors.json", "search_8x/factors.png", "search_second/factors.json",
               "recovery/factors.json", "finetune/model/config.json"):
    assert (tmp_path / path).exists(), path
  base = out["results"]["eval_base"]["table"]
  assert {"none", "pi", "ntk", "yarn", "longrope (λ + n̂)"} <= set(base)
  # The second stage multiplies the fine-tuning factors (saved as the product).
  ft = pipeline._factors(out["results"]["search_8x"]["factors"], pipeline._load("builtin")[0])
  second = pipeline._factors(out["results"]["search_second"]["factors"], pipeline._load("builtin")[0])
  assert all(b >= a - 1e-9 for a, b in zip(ft.long_factor, second.long_factor))
  # A rerun skips every finished step.
  lines.clear()
  pipeline.run_pipeline(config, str(tmp_path), print_fn=lines.append)
  assert sum("done already" in l for l in lines) == len(pipeline.STEPS)


def test_bad_pipeline_configs():
  config = reproduce_tiny.get_config("smoke")
  config.steps = ("search_second",)
  with pytest.raises(pipeline.PipelineError, match="needs step"):
    pipeline.validate(config)
  config = reproduce_tiny.get_config("smoke")
  config.steps = ("search_8x", "warp_drive")
  with pytest.raises(pipeline.PipelineError, match="unknown step"):
    pipeline.validate(config)
  config = reproduce_tiny.get_config("smoke")
  config.second_length = config.target_length
  with pytest.raises(pipeline.PipelineError, match="must exceed"):
    pipeline.validate(config)
  config = reproduce_tiny.get_config("smoke")
  config.warp = 9
  with pytest.raises(pipeline.PipelineError, match="warp"):
    pipeline.validate(config)
  config = reproduce_tiny.get_config("smoke")
  config.target_length = 0
  with pytest.raises(pipeline.PipelineError, match="target_length must be >= 1"):
    pipeline.validate(config)
