"""Multi-host behaviour for real: 2 JAX processes x 4 simulated CPU devices on this machine (jax.distributed with
a localhost coordinator, gloo collectives), against the same run as 1 process x 8 devices."""

import csv
import json
import os

import numpy as np
import pytest

from lrjax import testing

TRAIN = ["--config=configs/pretrain.py:tiny", "--config.stages[0].steps=5", "--config.stages[0].warmup_steps=0",
         "--config.stages[0].schedule=constant", "--config.checkpoint_every=100", "--config.async_checkpoints=False"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return [float(r["loss"]) for r in csv.DictReader(f)]


def _both(script, args, tmp_path, name, **kw):
  """The same command as 1 process x 8 devices and as 2 processes x 4 devices."""
  one = testing.launch(script, [*args, f"--workdir={tmp_path / name / 'one'}"], num_processes=1, devices=8, **kw)
  two = testing.launch(script, [*args, f"--workdir={tmp_path / name / 'two'}"], num_processes=2, devices=4, **kw)
  return tmp_path / name / "one", tmp_path / name / "two", one, two


@pytest.mark.parametrize("name, mesh", [
    ("sequence8_ring", ["--config.model.attention=ring", "--config.mesh.data=1", "--config.mesh.sequence=8"]),
    ("data2_fsdp2_sequence2", ["--config.model.attention=ring", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                               "--config.mesh.sequence=2"]),
])
def test_finetuning_across_processes_equals_one_process(tmp_path, name, mesh):
  one, two, _, _ = _both("train.py", [*TRAIN, *mesh], tmp_path, name)
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  assert len(_losses(two)) == 5


def test_search_across_processes_gives_the_same_seed_fitnesses(tmp_path):
  """A paper-style search (ring attention, the sequence axis spanning both processes) on the built-in model at
  2048 tokens: generation 0 (the PI/NTK/YaRN seeds) as in one process."""
  args = ["--config=configs/search.py:tiny", "--config.attention=ring", "--config.mesh.sequence=8",
          "--config.search.population=3", "--config.search.mutations=1", "--config.search.crossovers=0",
          "--config.search.parents=3", "--config.search.iterations=0", "--config.search.candidates_per_call=1",
          "--config.search.doc_batch=1", "--config.data.num_documents=2", "--config.progress=False"]
  one, two, _, _ = _both("search.py", args, tmp_path, "search")
  seeds = lambda d: json.loads((d / "summary.json").read_text())["seed_fitness"]
  assert seeds(one).keys() == {"pi", "ntk", "yarn"}
  for k, v in seeds(one).items():
    assert seeds(two)[k] == pytest.approx(v, rel=1e-5), k


def test_evaluate_with_ring_across_processes_equals_one_process(tmp_path):
  args = ["--config.attention=ring", "--config.mesh.data=1", "--config.mesh.sequence=8",
          "--config.lengths=(512,1024)", "--config.settings=('none','yarn')", "--config.num_documents=2",
          "--config.progress=False"]
  one, two, _, _ = _both("evaluate.py", args, tmp_path, "evaluate")
  cells = lambda d: {(c["setting"], c["length"]): c["ppl"] for c in json.loads((d / "results.json").read_text())["cells"]}
  assert len(cells(one)) == 4
  for key, ppl in cells(one).items():
    assert cells(two)[key] == pytest.approx(ppl, rel=1e-5), key


def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes(tmp_path):
  """SIGTERM to process 1 only: jax's preemption sync point makes both save the same step and exit 0; the run
  resumed to a few more steps reproduces an uninterrupted run; the HF export of 2 processes is byte-identical
  to the export of the same checkpoint by 1 process."""
  import signal
  import time
  wd = tmp_path / "run"
  long = [a for a in TRAIN if "steps=5" not in a] + ["--config.stages[0].steps=100000",
                                                     "--config.checkpoint_every=5"]
  procs = testing.start("train.py", [*long, f"--workdir={wd}"], num_processes=2, devices=4)
  deadline = time.time() + 300
  while not (wd / "checkpoints" / "10").exists() and time.time() < deadline and all(p.poll() is None for p in procs):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  results = testing.wait(procs, timeout=300)
  assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
  saved = [int(line.split("step ")[1].split(";")[0]) for _, out, err in results
           for line in (out + err).splitlines() if "saved checkpoint at step" in line]
  assert len(saved) == 2 and saved[0] == saved[1] and saved[0] >= 10, saved
  step = saved[0]
  assert str(step) in os.listdir(wd / "checkpoints")
  total = [a for a in TRAIN if "steps=5" not in a] + [f"--config.stages[0].steps={step + 3}"]
  testing.launch("train.py", [*total, f"--workdir={wd}", f"--config.export_hf={tmp_path / 'export2'}"],
                 num_processes=2, devices=4)
  ref = tmp_path / "reference"
  testing.launch("train.py", [*total, f"--workdir={ref}"], num_processes=1, devices=8)
  np.testing.assert_allclose(_losses(wd), _losses(ref), rtol=1e-5)
  # The finished run again, in one process: nothing left to train; its export must equal the 2-process one.
  testing.launch("train.py", [*total, f"--workdir={wd}", f"--config.export_hf={tmp_path / 'export1'}"],
                 num_processes=1, devices=8)
  for name in ("config.json", "model.safetensors"):
    assert (tmp_path / "export2" / name).read_bytes() == (tmp_path / "export1" / name).read_bytes(), name


_LOAD = '''
import json, os, sys
sys.path.insert(0, {root!r})
from lrjax import distributed
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
distributed.set_cpu_devices(int(flags["cpu_devices"]))
n = int(flags.get("num_processes", 1))
distributed.initialize(flags.get("coordinator"), n if n > 1 else None, int(flags["process_id"]) if n > 1 else None)
import jax
from lrjax import sharding, weights
def status(key):
  return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
jax.devices()
base = status("VmRSS")
cfg, params = weights.load_sharded({path!r}, sharding.make_mesh(dict(fsdp=8)))
jax.block_until_ready(params)
print(json.dumps(dict(peak=status("VmHWM"), base=base, local=sum(s.data.nbytes for a in jax.tree.leaves(params)
                                                                  for s in a.addressable_shards))))
'''


def test_sharded_loading_reads_only_each_process_share(tmp_path):
  """fsdp=8 over 2 processes: each process holds and reads half the weights, so its peak resident memory grows
  by about half of what one process holding all 8 shards grows by (both printed)."""
  import jax
  import ml_dtypes
  from lrjax import model, weights
  cfg = model.ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=8,
                          num_kv_heads=8, head_dim=128, param_dtype="bfloat16")
  shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32).astype(ml_dtypes.bfloat16), shapes)
  weights.save_hf(tmp_path / "ckpt", cfg, params, dtype="bfloat16", max_shard_bytes=100 << 20)
  del params
  script = tmp_path / "load.py"
  script.write_text(_LOAD.format(root=testing.ROOT, path=str(tmp_path / "ckpt")))
  (one,) = testing.launch(str(script), [], num_processes=1, devices=8)
  two = testing.launch(str(script), [], num_processes=2, devices=4)
  one = json.loads(one[1].strip().splitlines()[-1])
  two = [json.loads(r[1].strip().splitlines()[-1]) for r in two]
  grow = lambda r: r["peak"] - r["base"]
  mib = lambda x: f"{x / 2 ** 20:.0f} MiB"
  print(f"1 process: peak {mib(one['peak'])} (+{mib(grow(one))} loading {mib(one['local'])}); 2 processes: "
        + ", ".join(f"peak {mib(r['peak'])} (+{mib(grow(r))} loading {mib(r['local'])})" for r in two))
  assert all(r["local"] * 2 == one["local"] for r in two)       # each holds exactly half
  assert all(grow(r) <= 0.6 * grow(one) for r in two)
