"""Runs every benchmark in benchmarks/ and writes one markdown report.

  python benchmarks/run_all.py [--out benchmarks/REPORT.md] [--only eval_throughput,ring_memory] [--quick]

Each benchmark runs in its own subprocess (fresh memory statistics, its own XLA flags), one after another so
they do not compete for the cores; the report holds each one's command, wall time, exit status and output.
`--quick` passes `--quick` to benchmarks that accept it (smaller sizes, for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["eval_throughput", "eval_memory", "train_throughput", "search_throughput", "ring_memory", "gpu_step"]


def discover() -> list[str]:
  names = [f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f not in ("run_all.py", "__init__.py")
           and not f.startswith("_")]
  return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def accepts_quick(path: str) -> bool:
  with open(path) as f:
    return "--quick" in f.read()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(HERE, "REPORT.md"))
  parser.add_argument("--only", default="", help="comma-separated benchmark names")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
  args = parser.parse_args()
  names = discover()
  if args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      print(f"error: unknown benchmark(s) {', '.join(unknown)}; have {', '.join(names)}", file=sys.stderr)
      return 2
    names = [n for n in names if n in wanted]
  root = os.path.dirname(HERE)
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PYTHONUNBUFFERED="1")
  sections, failures = [], 0
  for i, name in enumerate(names):
    path = os.path.join(HERE, f"{name}.py")
    cmd = [sys.executable, path] + (["--quick"] if args.quick and accepts_quick(path) else [])
    print(f"[{i + 1}/{len(names)}] {' '.join(os.path.relpath(c, root) if c == path else c for c in cmd)}",
          flush=True)
    start = time.time()
    try:
      proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=args.timeout)
      output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      output, status = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    seconds = time.time() - start
    failures += status != 0
    print(f"    {'ok' if status == 0 else 'FAILED (' + str(status) + ')'} in {seconds:.0f} s", flush=True)
    sections.append(f"## {name}\n\n`{' '.join(['python', f'benchmarks/{name}.py'] + cmd[2:])}` — "
                    f"{seconds:.0f} s, exit {status}\n\n```\n{output.strip()[-20000:]}\n```\n")
  header = (f"# lrjax benchmark report\n\n{datetime.datetime.now().isoformat(timespec='seconds')} on "
            f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()})\n\n")
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    f.write(header + "\n".join(sections))
  os.replace(tmp, args.out)
  print(f"report: {args.out} ({len(names) - failures}/{len(names)} ok)")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
