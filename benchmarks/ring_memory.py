"""Ring attention memory on simulated devices: per-device footprint vs ring size, and the longest evaluation.

  python benchmarks/ring_memory.py                      # both parts
  python benchmarks/ring_memory.py --skip_eval          # part 1 only (about a minute)
  python benchmarks/ring_memory.py --eval_timeout 600   # give each evaluation probe more time
  python benchmarks/ring_memory.py --quick              # smoke run: 4096 tokens, one probe of 1024 per search

Part 1: compiled per-device memory (XLA's memory_analysis of the partitioned program: temporaries + arguments
+ outputs) of ring attention forward+backward at a fixed total length, on rings of 1, 2, 4 and 8 simulated
CPU devices, as a ratio to the 1-device figure (ideal 1/N; target <= 1.3/N).

Part 2: the longest perplexity evaluation of the built-in model (lrjax/assets/model; a random model of the
same shape when it is absent) on a (sequence=8) mesh of simulated devices within a memory budget (24 GiB by
default), by binary search over lengths, each probe in its own subprocess:
  * memory-bound length: the compiled footprint of all 8 devices (they share this host's RAM) fits the
    budget (compile only);
  * completed length: the evaluation also runs to the end within --eval_timeout seconds, with its resident
    memory watched and the probe killed above min(budget, free RAM - 2 GiB).
On CPU the second is bound by time, not memory (so it depends on the load; the compiled figures do not);
both are printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import harness  # noqa: E402  (puts the repository root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lrjax import loss as loss_lib  # noqa: E402
from lrjax import model as model_lib  # noqa: E402
from lrjax import ring as ring_lib  # noqa: E402
from lrjax import sharding as sharding_lib  # noqa: E402

GIB = 1024 ** 3
ROOT = harness.ROOT
MODEL_DIR = os.path.join(ROOT, "lrjax", "assets", "model")
RANDOM_SHAPE = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=2048)


def footprint(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled SPMD program."""
  m = compiled.memory_analysis()
  parts = dict(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes)
  parts["total"] = parts["temp"] + parts["argument"] + parts["output"] - parts["alias"]
  return parts


# ----------------------------------------------------------------------------------------------------------
# Part 1.


def attention_memory(n: int, length: int, heads: tuple[int, int, int], block: int, dtype) -> dict[str, int]:
  """Per-device bytes of ring attention fwd+bwd over `length` tokens on a ring of n devices."""
  mesh = sharding_lib.make_mesh({"sequence": n}, devices=jax.devices()[:n])
  nh, kh, h = heads
  x_sh = NamedSharding(mesh, P(("data", "fsdp"), "sequence", "tensor", None))
  pos_sh = NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
  q = jax.ShapeDtypeStruct((1, length, nh, h), dtype, sharding=x_sh)
  kv = jax.ShapeDtypeStruct((1, length, kh, h), dtype, sharding=x_sh)
  pos = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=pos_sh)

  def loss(q, k, v, dout, pos):
    out = ring_lib.ring_attention_sharded(q, k, v, pos, pos, block_q=block, block_k=block)
    return jnp.vdot(out.astype(jnp.float32), dout.astype(jnp.float32))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  with sharding_lib.mesh_context(mesh):
    compiled = step.lower(q, kv, kv, q, pos).compile()
  return footprint(compiled)


def part1(length: int, heads: tuple[int, int, int], block: int, dtype_name: str, bench: harness.Bench) -> None:
  dtype = jnp.dtype(dtype_name)
  print(f"Part 1: ring attention fwd+bwd, total length {length}, heads {heads[0]} (kv {heads[1]}) x "
        f"{heads[2]}, {dtype_name}, block {block}; per-device compiled memory")
  print(f"  {'ring':>4s} {'temp MiB':>10s} {'args MiB':>10s} {'out MiB':>10s} {'total MiB':>10s} "
        f"{'ratio':>7s} {'1.3/N':>7s}")
  base = None
  for n in (1, 2, 4, 8):
    m = attention_memory(n, length, heads, block, dtype)
    base = base or m["total"]
    ratio = m["total"] / base
    mark = "ok" if ratio <= 1.3 / n + 1e-9 else "OVER"
    bench.figure(f"part 1: ring of {n}, per device", m["total"] / 2**20, "MiB", timed=False, fmt=".1f")
    if n > 1:
      bench.ratio(f"part 1: ring of {n} / ring of 1 (target <= {1.3 / n:.3f}): {mark}", ratio, timed=False,
                  fmt=".3f", suffix="")
    print(f"  {n:4d} {m['temp'] / 2**20:10.1f} {m['argument'] / 2**20:10.1f} {m['output'] / 2**20:10.1f} "
          f"{m['total'] / 2**20:10.1f} {ratio:7.3f} {1.3 / n:7.3f} {mark}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Part 2: one probe (run in a subprocess).


def load_model():
  if os.path.isdir(MODEL_DIR):
    from lrjax import weights as weights_lib
    cfg, params = weights_lib.load(MODEL_DIR, dtype="float32")
    return cfg, params, "built-in model (lrjax/assets/model)"
  cfg = model_lib.ModelConfig(**RANDOM_SHAPE)
  return cfg, model_lib.init_params(cfg, jax.random.PRNGKey(0)), \
      "RANDOM model of the built-in shape (lrjax/assets/model not found)"


def corpus_bytes(length: int) -> np.ndarray:
  """length + 1 byte tokens of the built-in test split (tiled if shorter)."""
  path = os.path.join(ROOT, "lrjax", "assets", "corpus", "test.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    text = "".join(json.loads(line)["text"] for line in f).encode("utf-8")
  data = np.frombuffer(text, np.uint8).astype(np.int32)
  return np.resize(data, length + 1)


def probe(length: int, block: int, run: bool) -> dict:
  cfg, params, source = load_model()
  cfg = cfg.replace(attention="ring", block_q=block, block_k=block)
  ring = 8
  mesh = sharding_lib.make_mesh({"sequence": ring})
  sharding_lib.validate(mesh, batch=1, length=length, config=cfg, order="zigzag")
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=length))
  data_sh = sharding_lib.batch_sharding(mesh)
  p_sh = sharding_lib.param_shardings(mesh, params)

  def nll(params, batch, rope):
    hidden = model_lib.forward(cfg, params, batch["tokens"], batch["positions"], rope)
    total, count = loss_lib.chunked_nll(hidden, model_lib.head_weights(cfg, params), batch["targets"],
                                        batch["weights"])
    return total.sum(), count.sum()

  shapes = {k: jax.ShapeDtypeStruct((1, length), dt, sharding=data_sh)
            for k, dt in (("tokens", jnp.int32), ("targets", jnp.int32), ("positions", jnp.int32),
                          ("weights", jnp.float32))}
  abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_sh)
  start = time.time()
  with sharding_lib.mesh_context(mesh):
    compiled = jax.jit(nll).lower(abstract_params, shapes, rope).compile()
  out = dict(length=length, source=source, per_device=footprint(compiled)["total"], devices=ring,
             compile_s=time.time() - start)
  out["all_devices"] = out["per_device"] * ring
  if run:
    tokens = corpus_bytes(length)
    batch = {"tokens": tokens[None, :-1], "targets": tokens[None, 1:],
             "positions": np.arange(length, dtype=np.int32)[None], "weights": np.ones((1, length), np.float32)}
    batch = jax.device_put(ring_lib.load_balance(batch, ring, "zigzag"), data_sh)
    params = jax.device_put(params, p_sh)
    start = time.time()
    total, count = jax.block_until_ready(compiled(params, batch, rope))
    out.update(run_s=time.time() - start, nll_per_token=float(total) / float(count))
  return out


# ----------------------------------------------------------------------------------------------------------
# Part 2: the search (parent process).


def _rss_bytes(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def run_probe(length: int, block: int, run: bool, timeout: float, rss_cap: int) -> dict:
  """One probe in a subprocess; {'ok': bool, 'why': ..., plus the probe's figures}."""
  cmd = [sys.executable, os.path.abspath(__file__), "--probe", str(length), "--block", str(block)]
  if run:
    cmd.append("--probe_run")
  with harness.timed() as timing:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, peak, why = time.time(), 0, None
    while proc.poll() is None:
      peak = max(peak, _rss_bytes(proc.pid))
      if peak > rss_cap:
        why = f"resident memory above {rss_cap / GIB:.1f} GiB"
      elif time.time() - start > timeout:
        why = f"timeout {timeout:.0f}s"
      if why:
        proc.kill()
        proc.wait()
        break
      time.sleep(0.2)
    stdout, stderr = proc.communicate()
  if why:
    return dict(ok=False, length=length, why=why, peak_rss=peak, timing=str(timing))
  if proc.returncode:
    return dict(ok=False, length=length, why=f"exit {proc.returncode}: {stderr.strip().splitlines()[-1:]}",
                peak_rss=peak, timing=str(timing))
  result = json.loads(stdout.strip().splitlines()[-1])
  result.update(ok=True, peak_rss=peak, wall_s=time.time() - start, timing=str(timing))
  return result


def search(fits, lo: int, step: int, hi_limit: int, max_probes: int):
  """Largest multiple of `step` in [lo, hi_limit] with fits(length) true (doubling, then bisection).

  fits(length) -> (bool, result). Returns (best length or None, best result, log of probes).
  """
  log, best, best_res = [], None, None
  length = lo
  hi = None
  while length <= hi_limit and len(log) < max_probes:
    ok, res = fits(length)
    log.append(res)
    if not ok:
      hi = length
      break
    best, best_res = length, res
    length *= 2
  if hi is None:
    return best, best_res, log
  low = best or 0
  while hi - low > step and len(log) < max_probes:
    mid = (low + hi) // 2 // step * step
    if mid <= low:
      break
    ok, res = fits(mid)
    log.append(res)
    if ok:
      low, best, best_res = mid, mid, res
    else:
      hi = mid
  return best, best_res, log


def part2(args, bench: harness.Bench) -> None:
  budget = int(args.budget_gib * GIB)
  rss_cap = min(budget, max(_available_bytes() - 2 * GIB, GIB))
  step = 2 * 8 * args.eval_block  # zig-zag chunks of whole blocks on a ring of 8
  print(f"\nPart 2: longest perplexity evaluation on 8 simulated devices (ring over sequence=8, zig-zag), "
        f"budget {args.budget_gib:g} GiB, lengths in multiples of {step}")

  def by_memory(length):
    res = run_probe(length, args.eval_block, run=False, timeout=args.compile_timeout, rss_cap=rss_cap)
    ok = res["ok"] and res["all_devices"] <= budget
    _report("compile", res)
    return ok, res

  def by_completion(length):
    res = run_probe(length, args.eval_block, run=True, timeout=args.eval_timeout, rss_cap=rss_cap)
    ok = res["ok"] and res["all_devices"] <= budget
    _report("run", res)
    return ok, res

  if args.eval_search in ("both", "memory"):
    _memory_search(args, by_memory, step, bench)
  if args.eval_search in ("both", "completion"):
    _completion_search(args, by_completion, step, rss_cap, bench)


def _memory_search(args, by_memory, step, bench):
  best, res, _ = search(by_memory, step, step, args.max_length, args.memory_probes)
  bench.figure("part 2: memory-bound length (compiled, 8 devices)", best or "none", "tokens", timed=False,
               fmt="d")
  if best:
    bench.figure("part 2: memory-bound length, all 8 devices", res["all_devices"] / GIB, "GiB", timed=False,
                 fmt=".2f")
    print(f"  memory-bound: {best} tokens ({best / 1024:.0f}K) compile to {res['all_devices'] / GIB:.2f} GiB "
          f"over 8 devices ({res['per_device'] / GIB:.3f} GiB each, {res['per_device'] / best * 8:.0f} bytes "
          f"per local token); source: {res['source']}")


def _completion_search(args, by_completion, step, rss_cap, bench):
  best, res, log = search(by_completion, step, step, args.max_length, args.completion_probes)
  bench.figure(f"part 2: completed length within {args.eval_timeout:g} s", best or "none", "tokens", fmt="d")
  if best:
    bench.figure("part 2: completed length, run", res["run_s"], "s", fmt=".1f")
  failed = [r for r in log if not r["ok"]]
  if failed:
    shortest = min(failed, key=lambda r: r["length"])
    print(f"  shortest failed: {shortest['length']} tokens ({shortest['why']})")
  if best:
    print(f"  completed: {best} tokens ({best / 1024:.0f}K) in {res['run_s']:.0f}s run + {res['compile_s']:.0f}s "
          f"compile, peak RSS {res['peak_rss'] / GIB:.2f} GiB (cap {rss_cap / GIB:.1f} GiB), "
          f"{res['nll_per_token']:.3f} nats/token; source: {res['source']}")
  else:
    print("  completed: none within the limits")


def _report(kind, res):
  if res["ok"]:
    extra = f" run {res['run_s']:.1f}s nll/token {res['nll_per_token']:.3f}" if "run_s" in res else ""
    print(f"    {kind:7s} {res['length']:>9d}: {res['all_devices'] / GIB:7.3f} GiB compiled (8 devices), "
          f"compile {res['compile_s']:.1f}s, peak RSS {res['peak_rss'] / GIB:.2f} GiB{extra} "
          f"[probe process: {res['timing']}]", flush=True)
  else:
    print(f"    {kind:7s} {res['length']:>9d}: failed ({res['why']}) [probe process: {res['timing']}]", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=65536, help="part 1 total length")
  parser.add_argument("--heads", type=int, nargs=3, default=(4, 2, 64), help="part 1 q heads, kv heads, head dim")
  parser.add_argument("--block", type=int, default=512, help="part 1 flash block size")
  parser.add_argument("--dtype", default="float32", help="part 1 dtype")
  parser.add_argument("--skip_eval", action="store_true", help="part 1 only")
  parser.add_argument("--budget_gib", type=float, default=24.0)
  parser.add_argument("--eval_block", type=int, default=512, help="part 2 flash block size")
  parser.add_argument("--eval_timeout", type=float, default=300.0, help="seconds per completed-run probe")
  parser.add_argument("--compile_timeout", type=float, default=300.0, help="seconds per compile-only probe")
  parser.add_argument("--max_length", type=int, default=1 << 24)
  parser.add_argument("--memory_probes", type=int, default=24, help="compile-only probes (cheap)")
  parser.add_argument("--completion_probes", type=int, default=5,
                      help="probes that run the evaluation (each may take up to --eval_timeout)")
  parser.add_argument("--eval_search", choices=("both", "memory", "completion"), default="both")
  parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--probe_run", action="store_true", help=argparse.SUPPRESS)
  args = harness.parse_args(parser, argv, quick=dict(length=4096, block=256, eval_block=64, max_length=1024,
                                                     memory_probes=1, completion_probes=1))
  if args.probe:
    print(json.dumps(probe(args.probe, args.eval_block if args.block is None else args.block, args.probe_run)))
    return
  if len(jax.devices()) < 8:
    raise SystemExit(f"need 8 (simulated) devices, have {len(jax.devices())}; unset XLA_FLAGS or set "
                     "--xla_force_host_platform_device_count=8")
  bench = harness.Bench.start("ring_memory", args)
  with harness.timed() as timing:
    part1(args.length, tuple(args.heads), args.block, args.dtype, bench)
  print(f"  part 1: {timing}")
  if not args.skip_eval:
    with harness.timed() as timing:
      part2(args, bench)
    print(f"  part 2: {timing}")
  bench.finish()


if __name__ == "__main__":
  main()
