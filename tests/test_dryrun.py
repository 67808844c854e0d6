"""Every paper-scale config compiles its sharded programs on 8 simulated devices and fits its hardware."""

import json
import os
import sys

import ml_collections
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import finetune, pretrain, search  # noqa: E402
from lrjax import dryrun  # noqa: E402

TRAIN = ["llama2", "llama2_v5p", "mistral", "mistral_v5p"]
SEARCH = ["llama2_128k", "llama2_256k", "llama2_2048k", "llama2_short", "mistral_128k", "mistral_256k"]


@pytest.mark.parametrize("variant", TRAIN)
def test_paper_finetune_configs_fit(variant):
  report = dryrun.train_main(finetune.get_config(variant))
  assert "NO" not in report and report.count("train stage") == len(finetune.get_config(variant).stages)


@pytest.mark.parametrize("variant", SEARCH)
def test_paper_search_configs_fit(variant):
  report = dryrun.search_main(search.get_config(variant))
  assert "fitness x1 at" in report and " NO" not in report   # the program the search itself runs


def test_layout_that_does_not_fit_fails_with_one_line():
  c = search.get_config("llama2_128k")
  c.layout.device_memory_gb = 1.0
  with pytest.raises(dryrun.DryRunError, match=r"needs [\d.]+ GiB per device, more than the 1 GiB"):
    dryrun.search_main(c)


def test_memory_grows_linearly_with_length_and_shrinks_with_the_ring():
  """A tiny model's train step: per-device memory ~linear in length, and ~1/N over a sequence axis."""
  def bytes_at(length, sequence):
    c = pretrain.get_config("tiny")
    c.model.update(attention="ring" if sequence > 1 else "blockwise", block_q=256, block_k=256,
                   max_position_embeddings=length)
    c.batch_size, c.accumulation = 1, 1
    c.stages[0].update(length=length, steps=1, warmup_steps=0)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, sequence=sequence, tensor=1))
    c.loss_chunk = 256
    row = dryrun.run_in_subprocess("train", {"config": json.loads(c.to_json_best_effort())}, sequence)[0]
    return row["temp_bytes"]

  m4, m8 = bytes_at(4096, 1), bytes_at(8192, 1)
  assert m8 / m4 < 2.3
  assert bytes_at(8192, 4) < 0.5 * m8


def test_pod_layout_is_checked_on_a_slice_of_its_data_axis():
  c, note = dryrun.fit_to_devices(finetune.get_config("llama2_v5p"), 8)
  assert c.mesh.data == 1 and c.batch_size == 4 and "64 devices" in note
  bad = finetune.get_config("llama2")
  bad.mesh.update(data=1, fsdp=2, sequence=8)
  with pytest.raises(dryrun.DryRunError, match="only the data axis can shrink"):
    dryrun.fit_to_devices(bad, 8)
