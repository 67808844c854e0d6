"""Plumbing every benchmark shares: import path, quiet-machine check, CPU time beside wall time, one result block.

Run a benchmark from the repository root as `python benchmarks/NAME.py` or `bash run.sh python
benchmarks/NAME.py`: Python puts the script's directory (benchmarks/) on sys.path, so `import harness` works,
and importing it puts the repository root there too, so `lrjax` and `configs` import without installing.

Why a quiet machine: timings taken while other jobs share the cores do not compare across frameworks (PyTorch
and XLA degrade differently under contention; one ratio measured as 1.83x under load was 0.52x on a quiet
machine). So a benchmark reads the 1-minute load average before it starts. Above NOISY_LOAD_PER_CORE per core
it still runs, but every ratio of two timings is withheld (printed as NOISY_REFUSAL) and absolute timings are
marked "(noisy)"; with --allow_noisy the ratios are printed too, marked "(noisy)". Figures that do not depend
on timing (compiled memory, resident memory, counts) are never withheld.

  args = harness.parse_args(parser, quick=dict(runs=1))   # adds --allow_noisy and --quick
  bench = harness.Bench.start("eval_throughput", args)     # prints machine, backend, load before
  with harness.timed() as t:                               # t.wall_s, t.cpu_s (this process + its children)
    run()
  bench.figure("(a) lrjax", tokens_per_s, "tokens/s")      # -> "5065.3" or "5065.3 (noisy)"
  bench.ratio("(a) lrjax / transformers", r)               # -> "1.26x", "1.26x (noisy)" or NOISY_REFUSAL
  bench.finish()                                           # prints load after and the markdown block

run_all.py collects each block (from a BLOCK_START line to BLOCK_END) into benchmarks/REPORT.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from lrjax import report  # noqa: E402

NOISY_LOAD_PER_CORE = 1.0
NOISY_REFUSAL = "noisy: rerun on a quiet machine"
BLOCK_START = "<!-- lrjax-bench"
BLOCK_END = "<!-- /lrjax-bench -->"
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "libtpu", "flax", "optax", "numpy", "torch", "transformers")


# ----------------------------------------------------------------------------------------------------------
# The machine.


def load_average() -> float:
  """The 1-minute load average (runnable + uninterruptible tasks, system-wide)."""
  return os.getloadavg()[0]


def cores() -> int:
  return os.cpu_count() or 1


def is_noisy(load: float, num_cores: int) -> bool:
  """True when the 1-minute load exceeds NOISY_LOAD_PER_CORE per core (other jobs hold cores)."""
  return load / num_cores > NOISY_LOAD_PER_CORE


def format_load(load: float, num_cores: int) -> str:
  return f"{load:.2f} ({load / num_cores:.2f} per core, {num_cores} cores)"


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions() -> str:
  """Installed versions of the packages that decide the figures (PACKAGES), those present."""
  found = []
  for name in PACKAGES:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      found.append(f"{name} {importlib.metadata.version(name)}")
  return ", ".join(found)


def machine() -> dict[str, str]:
  """What the figures were measured on; reads files and package metadata only (imports nothing heavy)."""
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {"date": utc_now(), "cpu": f"{_cpu_model()} ({platform.machine()})", "cores": str(cores()),
          "memory": f"{memory:.1f} GiB", "os": platform.platform(),
          "python": f"{platform.python_version()} ({sys.executable})", "versions": versions()}


def backend() -> str:
  """XLA backend and device count of this process, if it has imported jax (importing it here would fix the
  platform and flags before the script sets them)."""
  if "jax" not in sys.modules:
    return "jax not imported in this process"
  jax = sys.modules["jax"]
  devices, name = jax.devices(), jax.default_backend()
  kind = "" if devices[0].device_kind == name else f" ({devices[0].device_kind})"
  return f"{name}{kind}, {len(devices)} device(s)"


# ----------------------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
  """Wall seconds and CPU seconds (user + sys of this process and its waited-for children) of one section.

  cpu / wall is how many cores the section kept busy: about 1 on a multi-core machine for a program that uses
  all of them means other jobs were holding the others.
  """

  wall_s: float = 0.0
  cpu_s: float = 0.0

  def __str__(self) -> str:
    busy = self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0
    return f"{self.wall_s:.3f} s wall, {self.cpu_s:.3f} s cpu ({busy:.2f} cores busy)"


def cpu_seconds() -> float:
  """User + sys seconds of this process (all threads) and of its children that have been waited for."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def timed() -> Iterator[Timing]:
  """`with timed() as t:` fills t.wall_s and t.cpu_s when the block ends."""
  timing = Timing()
  cpu, wall = cpu_seconds(), time.perf_counter()
  try:
    yield timing
  finally:
    timing.wall_s = time.perf_counter() - wall
    timing.cpu_s = cpu_seconds() - cpu


def median_timing(timings: Sequence[Timing]) -> Timing:
  """Median wall and median CPU seconds (each taken on its own)."""
  return Timing(statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings))


def interleaved(sides: Mapping[str, Callable[[], Any]], rounds: int, *, warm_up: bool = True,
                report=print) -> dict[str, list[Timing]]:
  """{side: [Timing per round]}: each side called once per round, sides alternating so that load from other
  processes hits them alike; with warm_up, one untimed call each first (compilation, caches), reported."""
  if warm_up:
    for name, run in sides.items():
      with timed() as timing:
        run()
      report(f"  warm-up {name}: {timing}")
  timings = {name: [] for name in sides}
  for _ in range(rounds):
    for name, run in sides.items():
      with timed() as timing:
        run()
      timings[name].append(timing)
  return timings


# ----------------------------------------------------------------------------------------------------------
# Flags, figures and the result block.


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               quick: dict | None = None) -> argparse.Namespace:
  """Adds --allow_noisy and --quick to `parser` and parses `argv`.

  `quick` maps argument names to the defaults of a smoke run; with --quick they replace the parser's defaults,
  so flags given explicitly still win.
  """
  parser.add_argument("--allow_noisy", action="store_true",
                      help=f"print timing ratios (marked noisy) even when the 1-minute load before the start "
                           f"exceeds {NOISY_LOAD_PER_CORE:g} per core")
  quick = quick or {}
  preset = " ".join(f"--{k}={v}" for k, v in quick.items())
  parser.add_argument("--quick", action="store_true", help=f"smoke run with small sizes: {preset}")
  args = parser.parse_args(argv)
  if args.quick and quick:
    parser.set_defaults(**quick)
    args = parser.parse_args(argv)
  return args


class Bench:
  """One benchmark run: the load before it, the noisy decision, its figures, and its markdown result block."""

  def __init__(self, name: str, allow_noisy: bool, load_before: float, num_cores: int):
    self.name, self.allow_noisy = name, allow_noisy
    self.load_before, self.num_cores = load_before, num_cores
    self.noisy = is_noisy(load_before, num_cores)
    self.date = utc_now()
    self.rows: list[tuple[str, str, str]] = []

  @classmethod
  def start(cls, name: str, args: argparse.Namespace) -> Bench:
    """Reads the load now and prints the machine, backend and load (call it after the script's own setup)."""
    bench = cls(name, args.allow_noisy, load_average(), cores())
    for key, value in machine().items():
      print(f"{key}: {value}")
    print(f"backend: {backend()}")
    print(f"load before: {format_load(bench.load_before, bench.num_cores)}")
    if bench.noisy:
      print(f"NOISY: load above {NOISY_LOAD_PER_CORE:g} per core before the start; timings are marked (noisy) "
            f"and timing ratios {'are marked (noisy)' if args.allow_noisy else 'are withheld'}", flush=True)
    return bench

  def figure(self, name: str, value: float | str, unit: str = "", *, timed: bool = True,
             fmt: str | None = None) -> str:
    """Records an absolute figure; returns it formatted, marked "(noisy)" when timed on a noisy machine.

    Args:
      name: what it is (a row of the result block).
      value: a number (formatted by `fmt`, a format spec such as ".2f", or report.format_number) or text.
      unit: its unit ("tokens/s", "GiB", ...).
      timed: whether it comes from a timing (load changes it); untimed figures are never marked.
      fmt: format spec for numbers.
    """
    text = value if isinstance(value, str) else format(value, fmt) if fmt else report.format_number(value)
    if timed and self.noisy:
      text += " (noisy)"
    self.rows.append((name, text, unit))
    return text

  def ratio(self, name: str, value: float, *, timed: bool = True, fmt: str = ".2f", suffix: str = "x") -> str:
    """Records a ratio ("1.26x", or "46.0%" with fmt=".1%", suffix=""); returns it as printed.

    A ratio of timings (timed=True) on a noisy machine is NOISY_REFUSAL unless --allow_noisy was given, then it
    is marked "(noisy)". Ratios of untimed figures (timed=False: memory, counts) are never withheld.
    """
    if timed and self.noisy and not self.allow_noisy:
      text = NOISY_REFUSAL
    else:
      text = f"{value:{fmt}}{suffix}" + (" (noisy)" if timed and self.noisy else "")
    self.rows.append((name, text, "ratio"))
    return text

  def state(self) -> str:
    if not self.noisy:
      return "quiet"
    return "noisy-allowed" if self.allow_noisy else "noisy"

  def block(self, load_after: float) -> str:
    """The markdown result block: one line of context, then a figure | value | unit table."""
    cell = lambda s: s.replace("|", "\\|")
    lines = [f"{BLOCK_START} name={self.name} state={self.state()} -->",
             f"{self.date}; {backend()}; load {self.load_before:.2f} before, {load_after:.2f} after "
             f"({self.load_before / self.num_cores:.2f} / {load_after / self.num_cores:.2f} per core, "
             f"{self.num_cores} cores): **{self.state()}**", "",
             "| figure | value | unit |", "|---|---|---|"]
    lines += [f"| {cell(n)} | {cell(v)} | {cell(u)} |" for n, v, u in self.rows]
    return "\n".join(lines + [BLOCK_END])

  def finish(self) -> str:
    """Prints the load now and the result block; returns the block."""
    load_after = load_average()
    print(f"load after: {format_load(load_after, self.num_cores)}")
    text = self.block(load_after)
    print(text, flush=True)
    return text


_BLOCK = re.compile(re.escape(BLOCK_START) + r" name=(\S+) state=(\S+) -->\n(.*?)\n" + re.escape(BLOCK_END),
                    re.DOTALL)


def find_blocks(output: str) -> list[tuple[str, str, str]]:
  """(name, state, markdown body) of every result block in a benchmark's output."""
  return _BLOCK.findall(output)
