"""Peak memory of a perplexity evaluation vs length: blockwise attention + chunked loss stay linear in length.

Model (a) of eval_throughput (d_model 256, 4 layers, 4 heads, vocab 256), one document of L tokens, the
truncate protocol through lrjax.perplexity.perplexity. Each length runs in a fresh subprocess and reports
  xla     XLA's compiled memory_analysis of the evaluation program: arguments + outputs + temporaries
  rss     the process's peak resident set (resource.getrusage ru_maxrss), and its increase over the RSS
          before compiling (the Python/JAX baseline and the parameters)
then the ratio per doubling of length (target <= 2.2x) and whether 128k fits 24 GiB.

  python benchmarks/eval_memory.py                           # 32k, 64k, 128k, executed (CPU: slow, ~O(L^2))
  python benchmarks/eval_memory.py --mode=compile            # memory_analysis only (seconds)
  python benchmarks/eval_memory.py --lengths=8192,16384 --layers=1
  python benchmarks/eval_memory.py --quick                   # smoke run: compile only, 4k and 8k, 1 layer

Memory does not depend on the load; the run seconds (and the wall/cpu time of each child) do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import harness  # first: puts the repository root on sys.path

GIB = 1 << 30


def child(length: int, layers: int, mode: str) -> dict:
  import resource

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lrjax import model as model_lib, perplexity

  cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=layers,
                              num_heads=4, num_kv_heads=4, head_dim=64)
  params = jax.device_put(model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  doc = np.random.RandomState(0).randint(0, 256, length).astype(np.int32)
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  base = rss()
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=length))
  tokens = jnp.asarray(doc[None])
  weights = jnp.ones((1, length - 1), jnp.float32)
  compiled = perplexity.compiled_window_nll(cfg).lower(params, tokens, rope, weights).compile()
  mem = compiled.memory_analysis()
  xla = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  out = {"length": length, "xla_bytes": int(xla), "xla_temp_bytes": int(mem.temp_size_in_bytes),
         "baseline_rss_bytes": int(base)}
  if mode == "run":
    with harness.timed() as timing:
      result = perplexity.perplexity(cfg, params, [doc], length=length, batch_size=1)
    out.update(seconds=timing.wall_s, cpu_seconds=timing.cpu_s, ppl=result.ppl, peak_rss_bytes=int(rss()))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="32768,65536,131072")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--mode", choices=("run", "compile"), default="run")
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = harness.parse_args(p, quick=dict(mode="compile", lengths="4096,8192", layers=1))
  if args.child:
    print("RESULT " + json.dumps(child(args.child, args.layers, args.mode)), flush=True)
    return
  # The children's platform (they inherit this environment); jax here only describes the backend.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: F401
  bench = harness.Bench.start("eval_memory", args)
  lengths = [int(n) for n in args.lengths.split(",")]
  print(f"model (a) with {args.layers} layers, mode={args.mode}; one fresh process per length")
  rows = []
  for n in lengths:
    with harness.timed() as timing:
      proc = subprocess.run([sys.executable, __file__, f"--child={n}", f"--layers={args.layers}",
                             f"--mode={args.mode}"], capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"{n}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
      sys.exit(1)
    r = json.loads(line[0][7:])
    rows.append(r)
    bench.figure(f"{n} tokens: compiled (xla)", r["xla_bytes"] / GIB, "GiB", timed=False, fmt=".3f")
    msg = f"{n:>7} tokens: xla {r['xla_bytes'] / GIB:7.3f} GiB (temp {r['xla_temp_bytes'] / GIB:.3f})"
    if "peak_rss_bytes" in r:
      bench.figure(f"{n} tokens: peak RSS", r["peak_rss_bytes"] / GIB, "GiB", timed=False, fmt=".3f")
      seconds = bench.figure(f"{n} tokens: evaluation", r["seconds"], "s", fmt=".1f")
      growth = (r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / GIB
      msg += (f"  peak rss {r['peak_rss_bytes'] / GIB:7.3f} GiB (+{growth:.3f} over baseline "
              f"{r['baseline_rss_bytes'] / GIB:.3f})  {seconds} s ({r['cpu_seconds']:.1f} s cpu)  ppl {r['ppl']:.2f}")
    print(msg + f"  [child process: {timing}]", flush=True)
  for a, b in zip(rows, rows[1:]):
    pair = f"{a['length']} -> {b['length']}"
    ratio = (f"{b['length'] // a['length']}x length: xla "
             f"{bench.ratio(f'{pair}: compiled (xla)', b['xla_bytes'] / a['xla_bytes'], timed=False)}")
    if "peak_rss_bytes" in a:
      ga = a["peak_rss_bytes"] - a["baseline_rss_bytes"]
      gb = b["peak_rss_bytes"] - b["baseline_rss_bytes"]
      rss = bench.ratio(f"{pair}: peak RSS", b["peak_rss_bytes"] / a["peak_rss_bytes"], timed=False)
      growth = bench.ratio(f"{pair}: RSS over baseline", gb / ga, timed=False)
      ratio += f", rss {rss} (increase over baseline {growth})"
    print(f"{pair} ({ratio})")
  last = rows[-1]
  peak = last.get("peak_rss_bytes", last["xla_bytes"])
  fits = bench.figure(f"{last['length']} tokens fit 24 GiB", "yes" if peak <= 24 * GIB else "NO", timed=False)
  print(f"{last['length']} tokens: {peak / GIB:.2f} GiB {'fits' if fits == 'yes' else 'DOES NOT fit'} 24 GiB")
  bench.finish()


if __name__ == "__main__":
  main()
