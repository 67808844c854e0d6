"""Runs every benchmark in benchmarks/, one at a time, and writes one markdown report.

  python benchmarks/run_all.py [--out benchmarks/REPORT.md] [--only eval_throughput,ring_memory] [--quick]
                               [--allow_noisy] [--settle 120] [--timeout 3600]

Each benchmark runs in its own subprocess (fresh memory statistics, its own XLA flags), one after another so
they do not compete for the cores. Before each one, run_all waits up to --settle seconds for the 1-minute load
to fall to the quiet threshold (benchmarks/harness.py), so the previous benchmark's own load does not count
against the next. The report holds the machine, the versions, the date, and for each benchmark its command,
load before and after, wall and CPU time, exit status, its result block and its full output. A benchmark that
started above the threshold is marked noisy, and its timing ratios are withheld unless --allow_noisy is given.
`--quick` passes `--quick` to every benchmark (small sizes, for a smoke run; never figures to publish).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import harness  # first: puts the repository root on sys.path

from lrjax import report

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["eval_throughput", "eval_memory", "train_throughput", "search_throughput", "ring_memory", "gpu_step"]
NOT_BENCHMARKS = ("run_all.py", "harness.py", "__init__.py")


class UnknownBenchmarkError(ValueError):
  """--only names a script that is not in benchmarks/."""


def discover(directory: str = HERE) -> list[str]:
  """Benchmark names (scripts in `directory`), in ORDER first, then alphabetically."""
  names = [f[:-3] for f in os.listdir(directory) if f.endswith(".py") and f not in NOT_BENCHMARKS
           and not f.startswith("_")]
  return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def select(names: list[str], only: str) -> list[str]:
  """The names listed in `only` (comma-separated; empty: all), in the order of `names`."""
  if not only:
    return names
  wanted = only.split(",")
  unknown = sorted(set(wanted) - set(names))
  if unknown:
    raise UnknownBenchmarkError(f"--only: unknown benchmark(s) {', '.join(unknown)}; have {', '.join(names)}")
  return [n for n in names if n in wanted]


def wait_for_quiet(max_seconds: float, poll_seconds: float = 5.0) -> float:
  """Waits until the 1-minute load is at most the quiet threshold or `max_seconds` pass; returns the load."""
  deadline = time.monotonic() + max_seconds
  load, cores = harness.load_average(), harness.cores()
  if harness.is_noisy(load, cores) and max_seconds > 0:
    print(f"    load {harness.format_load(load, cores)}: waiting up to {max_seconds:.0f} s for it to settle",
          flush=True)
  while harness.is_noisy(load, cores) and time.monotonic() < deadline:
    time.sleep(min(poll_seconds, max(deadline - time.monotonic(), 0)))
    load = harness.load_average()
  return load


@dataclasses.dataclass
class Run:
  """One benchmark subprocess and what it left behind."""

  name: str
  command: str
  status: int | str
  timing: harness.Timing
  load_before: float
  load_after: float
  output: str

  @property
  def blocks(self) -> list[tuple[str, str, str]]:
    return harness.find_blocks(self.output)

  @property
  def noisy(self) -> bool:
    """Started above the threshold: by run_all's reading just before, or by the benchmark's own."""
    return (harness.is_noisy(self.load_before, harness.cores())
            or any(state != "quiet" for _, state, _ in self.blocks))


def run_one(name: str, flags: list[str], timeout: float, directory: str = HERE) -> Run:
  """Runs benchmarks/NAME.py from the repository root, echoing its output; kills its process group on timeout."""
  cmd = [sys.executable, os.path.join(directory, f"{name}.py"), *flags]
  command = " ".join(["python", os.path.relpath(cmd[1], harness.ROOT), *flags])
  load_before = harness.load_average()
  lines, timed_out = [], threading.Event()
  with harness.timed() as timing:
    # Its own session, so a timeout also ends the probes and children it started.
    proc = subprocess.Popen(cmd, cwd=harness.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)

    def kill():
      timed_out.set()
      with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
      for line in proc.stdout:
        print("    " + line, end="", flush=True)
        lines.append(line)
      proc.wait()
    finally:
      timer.cancel()
      if proc.poll() is None:  # interrupted: end it and its children rather than leave them running
        kill()
        proc.wait()
  status = "timeout" if timed_out.is_set() else proc.returncode
  return Run(name, command, status, timing, load_before, harness.load_average(), "".join(lines))


def render(runs: list[Run], machine: dict[str, str], argv: list[str]) -> str:
  """The report: machine and versions, a summary table, then each benchmark's block and full output."""
  cores = harness.cores()
  per_core = lambda load: f"{load:.2f} ({load / cores:.2f})"
  lines = ["# lrjax benchmark report", "", f"`{' '.join(['python', 'benchmarks/run_all.py', *argv])}`", ""]
  lines += [f"- {key}: {value}" for key, value in machine.items()]
  lines += ["", f"A benchmark is **noisy** when the 1-minute load before it exceeded "
            f"{harness.NOISY_LOAD_PER_CORE:g} per core: its timings are marked (noisy) and its timing ratios are "
            f"withheld (\"{harness.NOISY_REFUSAL}\") unless --allow_noisy was given.", "",
            "| benchmark | exit | wall s | cpu s | load before (per core) | load after (per core) | state |",
            "|---|---|---|---|---|---|---|"]
  for r in runs:
    state = "noisy" if r.noisy else "quiet"
    lines.append(f"| {r.name} | {r.status} | {r.timing.wall_s:.0f} | {r.timing.cpu_s:.0f} | "
                 f"{per_core(r.load_before)} | {per_core(r.load_after)} | {state} |")
  for r in runs:
    lines += ["", f"## {r.name}{' (noisy)' if r.noisy else ''}", "", f"`{r.command}`: exit {r.status}, {r.timing}; "
              f"load {per_core(r.load_before)} before, {per_core(r.load_after)} after", ""]
    lines += [body for _, _, body in r.blocks] or ["No result block (the benchmark did not finish)."]
    lines += ["", "<details><summary>output</summary>", "", "```", r.output.strip()[-20000:], "```", "",
              "</details>"]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(HERE, "REPORT.md"))
  parser.add_argument("--only", default="", help="comma-separated benchmark names")
  parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke run)")
  parser.add_argument("--allow_noisy", action="store_true", help="pass --allow_noisy to every benchmark")
  parser.add_argument("--settle", type=float, default=120, help="most seconds to wait for a quiet load")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  try:
    names = select(discover(), args.only)
  except UnknownBenchmarkError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  flags = ["--quick"] * args.quick + ["--allow_noisy"] * args.allow_noisy
  machine = harness.machine()
  runs = []
  for i, name in enumerate(names):
    print(f"[{i + 1}/{len(names)}] {name}", flush=True)
    wait_for_quiet(args.settle)
    run = run_one(name, flags, args.timeout)
    runs.append(run)
    print(f"    {'ok' if run.status == 0 else f'FAILED ({run.status})'}{' (noisy)' if run.noisy else ''}: "
          f"{run.timing}", flush=True)
  report.write_text(args.out, render(runs, machine, argv))
  failures = sum(r.status != 0 for r in runs)
  print(f"report: {args.out} ({len(runs) - failures}/{len(runs)} ok, {sum(r.noisy for r in runs)} noisy)")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
