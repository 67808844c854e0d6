"""The shared command line: config overrides, one-line errors for every kind of bad input, quiet logs."""

import os
import subprocess
import sys

import pytest

from lrjax import cli, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  return subprocess.run([sys.executable, f"experiments/{script}", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""))


def test_overrides_are_typed_and_reach_nested_and_list_keys():
  args = cli.parse(["--config=configs/finetune.py:tiny", "--config.stages[0].length=512",
                    "--config.optimizer.b2=0.99", "--config.async_checkpoints=false",
                    "--config.mesh.data=2", "--workdir=/tmp/w"], default_config="configs/pretrain.py")
  c = args.config
  assert c.stages[0].length == 512 and c.optimizer.b2 == 0.99 and c.async_checkpoints is False
  assert c.mesh.data == 2 and args.workdir == "/tmp/w"
  args = cli.parse(["--config.lengths=(64, 128)", "--config.settings=('none','yarn')"],
                   default_config="configs/evaluate.py")
  assert args.config.lengths == (64, 128) and args.config.settings == ("none", "yarn")


@pytest.mark.parametrize("script, args, message", [
    ("search.py", ["--config=configs/search.py:tiny", "--config.foo=1"],
     "unknown config key config.foo (nothing reads it)"),
    ("train.py", ["--config=configs/finetune.py:tiny", "--config.stages[0].lenght=512"],
     "unknown config key config.stages[0].lenght (nothing reads it); did you mean config.stages[0].length?"),
    ("search.py", ["--config=configs/search.py:tny"], "unknown search config 'tny'"),
    ("evaluate.py", ["--config.batch_size=two"], "--config.batch_size: 'two' is not a int"),
    ("convert.py", ["--config.source=/nonexistent", "--config.dest=/tmp/x", "--bogus=1"], "unknown flag --bogus"),
    ("demo.py", ["--config=configs/nope.py"], "no such config file"),
])
def test_bad_command_lines_print_one_line(script, args, message, tmp_path):
  out = _run(script, *args, f"--workdir={tmp_path}")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
      out.stderr[-2000:]


def test_commands_are_quiet_by_default(tmp_path):
  """The first lines a user sees are lrjax's: no absl/XLA INFO such as "Unable to initialize backend 'tpu'"."""
  args = ["--config.lengths=(64,)", "--config.settings=('none',)", "--config.num_documents=1",
          "--config.progress=False", "--config.min_tokens=64"]
  quiet = _run("evaluate.py", *args, f"--workdir={tmp_path / 'a'}")
  assert quiet.returncode == 0, quiet.stderr[-2000:]
  assert quiet.stderr.strip() == "" and quiet.stdout.startswith("perplexity (truncate)"), quiet.stdout + quiet.stderr
  loud = _run("evaluate.py", *args, "--verbosity=1", f"--workdir={tmp_path / 'b'}")
  assert loud.returncode == 0 and "PjRt-IFRT device count" in loud.stderr   # library INFO logs on request


def test_cluster_detection_from_the_environment():
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: single
  assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "8"}) == "openmpi"
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu_pod"
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None       # one TPU host
  with pytest.raises(distributed.DistributedError, match="needs all of --coordinator"):
    distributed.initialize("localhost:1234", None, 0)
  with pytest.raises(distributed.DistributedError, match=r"--process_id must be in \[0, 2\), got 2"):
    distributed.initialize("localhost:1234", 2, 2)
