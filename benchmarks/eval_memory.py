"""Peak memory of a perplexity evaluation vs length: blockwise attention + chunked loss stay linear in length.

Model (a) of eval_throughput (d_model 256, 4 layers, 4 heads, vocab 256), one document of L tokens, the
truncate protocol through lrjax.evaluate.perplexity. Each length runs in a fresh subprocess and reports
  xla     XLA's compiled memory_analysis of the evaluation program: arguments + outputs + temporaries
  rss     the process's peak resident set (resource.getrusage ru_maxrss), and its increase over the RSS
          before compiling (the Python/JAX baseline and the parameters)
then the ratio per doubling of length (target <= 2.2x) and whether 128k fits 24 GiB.

  python benchmarks/eval_memory.py                           # 32k, 64k, 128k, executed (CPU: slow, ~O(L^2))
  python benchmarks/eval_memory.py --mode=compile            # memory_analysis only (seconds)
  python benchmarks/eval_memory.py --lengths=8192,16384 --layers=1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 1 << 30


def child(length: int, layers: int, mode: str) -> dict:
  import resource

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lrjax import evaluate, model as model_lib

  cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=layers,
                              num_heads=4, num_kv_heads=4, head_dim=64)
  params = jax.device_put(model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  doc = np.random.RandomState(0).randint(0, 256, length).astype(np.int32)
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  base = rss()
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=length))
  tokens = jnp.asarray(doc[None])
  weights = jnp.ones((1, length - 1), jnp.float32)
  compiled = evaluate.compiled_window_nll(cfg).lower(params, tokens, rope, weights).compile()
  mem = compiled.memory_analysis()
  xla = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  out = {"length": length, "xla_bytes": int(xla), "xla_temp_bytes": int(mem.temp_size_in_bytes),
         "baseline_rss_bytes": int(base)}
  if mode == "run":
    start = time.perf_counter()
    result = evaluate.perplexity(cfg, params, [doc], length=length, batch_size=1)
    out.update(seconds=time.perf_counter() - start, ppl=result.ppl, peak_rss_bytes=int(rss()))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="32768,65536,131072")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--mode", choices=("run", "compile"), default="run")
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args.child, args.layers, args.mode)), flush=True)
    return
  lengths = [int(n) for n in args.lengths.split(",")]
  print(f"model (a) with {args.layers} layers, mode={args.mode}; one fresh process per length")
  rows = []
  for n in lengths:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, f"--child={n}", f"--layers={args.layers}",
                           f"--mode={args.mode}"], capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"{n}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
      sys.exit(1)
    r = json.loads(line[0][7:])
    rows.append(r)
    msg = f"{n:>7} tokens: xla {r['xla_bytes'] / GIB:7.3f} GiB (temp {r['xla_temp_bytes'] / GIB:.3f})"
    if "peak_rss_bytes" in r:
      msg += (f"  peak rss {r['peak_rss_bytes'] / GIB:7.3f} GiB (+{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / GIB:.3f}"
              f" over baseline {r['baseline_rss_bytes'] / GIB:.3f})  {r['seconds']:.0f}s  ppl {r['ppl']:.2f}")
    print(msg, flush=True)
  for a, b in zip(rows, rows[1:]):
    ratio = f"{b['length'] // a['length']}x length: xla x{b['xla_bytes'] / a['xla_bytes']:.2f}"
    if "peak_rss_bytes" in a:
      ga = a["peak_rss_bytes"] - a["baseline_rss_bytes"]
      gb = b["peak_rss_bytes"] - b["baseline_rss_bytes"]
      ratio += f", rss x{b['peak_rss_bytes'] / a['peak_rss_bytes']:.2f} (increase over baseline x{gb / ga:.2f})"
    print(f"{a['length']} -> {b['length']} ({ratio})")
  last = rows[-1]
  peak = last.get("peak_rss_bytes", last["xla_bytes"])
  print(f"{last['length']} tokens: {peak / GIB:.2f} GiB {'fits' if peak <= 24 * GIB else 'DOES NOT fit'} 24 GiB")


if __name__ == "__main__":
  main()
