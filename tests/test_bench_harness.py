"""Benchmark plumbing: CPU time beside wall time, the noisy-machine gate, flags, result blocks, run_all's report."""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)  # the scripts import their helper as `harness`, as when run as benchmarks/NAME.py

import harness  # noqa: E402
import run_all  # noqa: E402

REFUSAL = "noisy: rerun on a quiet machine"  # the wording the benchmarks promise


def _burn(seconds: float) -> None:
  """Spins this thread until it has used `seconds` of CPU."""
  start = time.process_time()
  while time.process_time() - start < seconds:
    pass


def test_timed_counts_cpu_used_not_time_asleep():
  with harness.timed() as busy:
    _burn(0.2)
  assert busy.cpu_s >= 0.2  # (it may be more: CPU time counts every thread of the process)
  with harness.timed() as asleep:
    time.sleep(0.2)
  assert asleep.wall_s >= 0.2
  assert asleep.cpu_s < 0.05


def test_timed_counts_children_that_were_waited_for():
  child = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
  with harness.timed() as timing:
    subprocess.run([sys.executable, "-c", child], check=True)
  assert timing.cpu_s >= 0.3  # the child's own CPU seconds, added after it was reaped


def test_median_timing_takes_each_median_on_its_own():
  m = harness.median_timing([harness.Timing(3.0, 0.1), harness.Timing(1.0, 0.9), harness.Timing(2.0, 0.5)])
  assert (m.wall_s, m.cpu_s) == (2.0, 0.5)
  assert str(harness.Timing(2.0, 3.0)) == "2.000 s wall, 3.000 s cpu (1.50 cores busy)"


@pytest.mark.parametrize("load, cores, noisy", [(2.0, 2, False), (2.02, 2, True), (0.0, 1, False),
                                                (8.5, 8, True), (7.9, 8, False)])
def test_noisy_means_more_than_one_runnable_task_per_core(load, cores, noisy):
  assert harness.is_noisy(load, cores) is noisy
  assert harness.Bench("b", False, load, cores).noisy is noisy


def test_quiet_machine_reports_every_figure_unmarked():
  bench = harness.Bench("eval", allow_noisy=False, load_before=1.9, num_cores=2)
  assert bench.figure("lrjax", 5065.3, "tokens/s", fmt=".0f") == "5065"
  assert bench.ratio("lrjax / transformers", 1.2649) == "1.26x"
  block = bench.block(load_after=1.5)
  assert "| lrjax / transformers | 1.26x | ratio |" in block
  assert "| lrjax | 5065 | tokens/s |" in block
  [(name, state, body)] = harness.find_blocks("before\n" + block + "\nafter")
  assert (name, state) == ("eval", "quiet")
  assert "0.95 / 0.75 per core" in body


def test_noisy_machine_withholds_timing_ratios_and_marks_timings():
  bench = harness.Bench("eval", allow_noisy=False, load_before=3.0, num_cores=2)
  assert bench.ratio("lrjax / transformers", 1.2649) == REFUSAL
  assert bench.figure("lrjax", 5065.3, "tokens/s", fmt=".0f") == "5065 (noisy)"
  # Compiled memory and counts do not depend on the load: never withheld, never marked.
  assert bench.figure("compiled", 0.0312, "GiB", timed=False, fmt=".3f") == "0.031"
  assert bench.ratio("memory per doubling", 1.88, timed=False) == "1.88x"
  block = bench.block(load_after=3.0)
  assert "1.26" not in block and f"| lrjax / transformers | {REFUSAL} | ratio |" in block
  assert harness.find_blocks(block)[0][1] == "noisy"


def test_allow_noisy_prints_ratios_marked_noisy():
  bench = harness.Bench("train", allow_noisy=True, load_before=3.0, num_cores=2)
  assert bench.ratio("lrjax / torch", 0.523) == "0.52x (noisy)"
  assert bench.ratio("util", 0.4567, fmt=".1%", suffix="") == "45.7% (noisy)"
  assert harness.find_blocks(bench.block(3.0))[0][1] == "noisy-allowed"


def test_start_and_finish_print_machine_and_load(capsys):
  bench = harness.Bench.start("b", argparse.Namespace(allow_noisy=False))
  bench.figure("x", 1.5, "s")
  block = bench.finish()
  out = capsys.readouterr().out
  for key in ("date", "cpu", "cores", "memory", "os", "python", "versions", "backend", "load before",
              "load after"):
    assert f"\n{key}: " in "\n" + out, key
  assert block in out


def test_machine_description_matches_independent_sources():
  desc = harness.machine()
  assert desc["cores"] == str(os.cpu_count())
  assert f"numpy {np.__version__}" in desc["versions"]
  assert desc["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
  date = datetime.datetime.strptime(desc["date"], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=datetime.timezone.utc)
  assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 60
  if os.path.exists("/proc/meminfo"):
    with open("/proc/meminfo") as f:
      kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    assert float(desc["memory"].split()[0]) == pytest.approx(kib / 2**20, rel=0.02)


def test_quick_changes_defaults_and_explicit_flags_still_win():
  def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--shapes", default="a,b")
    return harness.parse_args(p, argv, quick=dict(runs=1, shapes="a"))

  assert (parse([]).runs, parse([]).shapes, parse([]).quick, parse([]).allow_noisy) == (5, "a,b", False, False)
  assert (parse(["--quick"]).runs, parse(["--quick"]).shapes) == (1, "a")
  assert parse(["--quick", "--runs=3"]).runs == 3
  assert parse(["--allow_noisy"]).allow_noisy


def test_run_all_discovers_every_benchmark_in_order_and_rejects_unknown_names():
  names = run_all.discover()
  scripts = {f[:-3] for f in os.listdir(os.path.dirname(run_all.__file__))
             if f.endswith(".py") and f not in ("run_all.py", "harness.py")}
  assert sorted(names) == sorted(scripts) and "real_model" in names
  assert names[:6] == ["eval_throughput", "eval_memory", "train_throughput", "search_throughput", "ring_memory",
                       "gpu_step"]
  assert run_all.select(names, "gpu_step,eval_memory") == ["eval_memory", "gpu_step"]
  with pytest.raises(ValueError, match="unknown benchmark.*eval_speed"):
    run_all.select(names, "eval_speed")


@pytest.mark.parametrize("name", ["run_all", "eval_memory", "eval_throughput", "search_throughput"])
def test_scripts_import_lrjax_from_the_repository_root(name):
  """`python benchmarks/NAME.py` with no PYTHONPATH (the bug was ModuleNotFoundError: lrjax). Each script's
  first import is harness, which imports lrjax.report; --help exits before the heavy imports in these four."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--help"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--quick" in proc.stdout and "--allow_noisy" in proc.stdout


FAKE = """
import subprocess, sys, time
sys.path.insert(0, {bench_dir!r})
import harness
args = harness.parse_args(__import__("argparse").ArgumentParser(), quick=dict())
bench = harness.Bench.start("fake", args)
if {sleep}:
  subprocess.Popen([sys.executable, "-c", "import os, time; open({pid_file!r}, 'w').write(str(os.getpid())); "
                    "time.sleep(60)"])
  time.sleep(60)
with harness.timed() as t:
  sum(range(10 ** 5))
bench.figure("sum", t.wall_s, "s")
bench.ratio("quick / slow", 2.0)
bench.finish()
"""


def _fake(tmp_path, sleep: bool) -> str:
  pid_file = str(tmp_path / "grandchild.pid")
  (tmp_path / "fake.py").write_text(textwrap.dedent(FAKE.format(bench_dir=BENCH_DIR, sleep=sleep,
                                                                pid_file=pid_file)))
  return pid_file


def test_run_all_collects_the_block_into_the_report(tmp_path):
  _fake(tmp_path, sleep=False)
  run = run_all.run_one("fake", ["--quick"], timeout=120, directory=str(tmp_path))
  assert run.status == 0, run.output
  [(name, state, body)] = run.blocks
  assert name == "fake" and "| quick / slow |" in body
  text = run_all.render([run], harness.machine(), ["--quick"])
  assert "`python benchmarks/run_all.py --quick`" in text
  for key in ("date", "cpu", "cores", "memory", "os", "python", "versions"):
    assert f"\n- {key}: " in text, key
  assert body in text and "fake.py --quick" in text
  assert "| fake | 0 | " in text


def _running(pid: int) -> bool:
  """Whether `pid` exists and is not a zombie (killed, awaiting its reaper)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_run_all_kills_a_benchmark_and_its_children_on_timeout(tmp_path):
  pid_file = _fake(tmp_path, sleep=True)
  start = time.monotonic()
  run = run_all.run_one("fake", [], timeout=5, directory=str(tmp_path))
  assert run.status == "timeout" and time.monotonic() - start < 30
  assert not run.blocks and "No result block" in run_all.render([run], {}, [])
  pid = int(open(pid_file).read())
  try:
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not _running(pid), "the benchmark's child outlived the timeout"
  finally:
    if _running(pid):
      os.kill(pid, 9)


def test_report_marks_a_benchmark_noisy_by_its_load_or_its_own_verdict():
  cores = os.cpu_count()
  block = lambda state: f"{harness.BLOCK_START} name=b state={state} -->\nctx\n\n| figure |\n{harness.BLOCK_END}"
  quiet = run_all.Run("b", "python benchmarks/b.py", 0, harness.Timing(1, 1), 0.0, 0.0, block("quiet"))
  busy = run_all.Run("b", "python benchmarks/b.py", 0, harness.Timing(1, 1), 1.5 * cores, 0.0, block("quiet"))
  self_noisy = run_all.Run("b", "python benchmarks/b.py", 0, harness.Timing(1, 1), 0.0, 0.0, block("noisy"))
  assert (quiet.noisy, busy.noisy, self_noisy.noisy) == (False, True, True)
  text = run_all.render([quiet, busy], {}, [])
  assert text.count("| quiet |") == 1 and text.count("| noisy |") == 1 and "## b (noisy)" in text
