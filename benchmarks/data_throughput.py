"""Input-pipeline throughput and memory: lrjax.stream over prepared records vs what a train step consumes.

  python benchmarks/data_throughput.py [--length 32768] [--rows 4] [--batches 20] [--workers 0,2] [--quick]

1. Prepares the built-in corpus (builtin:train, or builtin:valid with --quick) repeated `--repeat` times, and a
   10x larger copy, with lrjax.records (byte tokenizer); prints prepare tokens/s.
2. Loader: tokens/s of `stream.batches` at `--length`-token rows, `--rows` rows per batch, for each worker
   count (the first batch, which includes starting the workers, is not timed).
3. Consumption: tokens/s of jitted lrjax.train steps of the built-in model's architecture (configs/finetune.py
   tiny; blockwise attention, 512 blocks) at the same length, batch `--step_batch`; the loader should be >= 10x.
4. Memory: peak RSS (VmHWM) of a fresh process that opens the records and reads `--batches` batches
   (num_workers=0), for the 1x and the 10x corpus; the loader holds only per-document index data, so the two
   should agree within 10%.
--quick: builtin:valid, length 2048, 5 batches, 1 step, workers 0 (a smoke run on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrjax import data, records, stream  # noqa: E402


def prepare_repeated(out: str, split: str, repeat: int, workers: int) -> float:
  """Prepare builtin:SPLIT repeated `repeat` times into `out`; returns tokens/s."""
  src = os.path.join(out + ".jsonl")
  with open(src, "w") as f:
    for r in range(repeat):
      for doc in data.documents(f"builtin:{split}"):
        f.write(json.dumps({"id": f"{r}/{doc.id}", "text": doc.text}) + "\n")
  t0 = time.perf_counter()
  manifest = records.prepare(src, out, shard_documents=64, num_workers=workers, progress=False)
  os.remove(src)
  return manifest["tokens"] / (time.perf_counter() - t0)


def loader_rate(path: str, length: int, rows: int, batches: int, workers: int) -> float:
  """Tokens/s of the loader after its first batch."""
  with stream.batches([stream.Component(records.Records(path))], length=length, global_batch=rows, seed=0,
                      reset_positions=True, document_mask=True, num_workers=workers) as it:
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * rows * length / (time.perf_counter() - t0)


def step_rate(length: int, batch: int, steps: int) -> float:
  """Tokens/s of jitted train steps of the built-in model's architecture at `length` tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import finetune
  from lrjax import sharding as sharding_lib
  from lrjax import train

  c = finetune.get_config("tiny")
  cfg = train.model_config(c).replace(attention="blockwise", block_q=512, block_k=512)
  stage = train.parse_stages(c, cfg)[0]
  optimizer = train.make_optimizer(c.optimizer, stage)
  mesh = sharding_lib.make_mesh({}, devices=jax.devices()[:1])
  with sharding_lib.mesh_context(mesh):
    state = train.init_state(cfg, optimizer, jax.random.PRNGKey(0))
    sh = train.state_shardings(mesh, jax.eval_shape(lambda: state), optimizer)
    step = train.jit_train_step(train.make_train_step(cfg, optimizer, loss_chunk=min(length, 2048)), mesh, sh)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, length + 1), dtype=np.int32)
    host = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (1, batch, length)).copy(),
            "weights": np.ones((1, batch, length), np.float32)}
    batch_arrays = jax.device_put(host, train.batch_shardings(mesh))
    rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(stage.rope, seq_len=length))
    state = jax.device_put(state, sh)
    state, metrics = step(state, batch_arrays, rope)  # compile
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch_arrays, rope)
    jax.block_until_ready(metrics["loss"])
    return steps * batch * length / (time.perf_counter() - t0)


def rss_child(path: str, length: int, rows: int, batches: int) -> None:
  """(In a fresh process) read `batches` batches; print the peak RSS in MiB."""
  with stream.batches([stream.Component(records.Records(path))], length=length, global_batch=rows, seed=0,
                      reset_positions=True, document_mask=True) as it:
    for _ in range(batches):
      next(it)
  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
  with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)


def peak_rss(path: str, length: int, rows: int, batches: int) -> float:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss_child", path, "--length", str(length),
                        "--rows", str(rows), "--batches", str(batches)], check=True, capture_output=True, text=True)
  return float(out.stdout.split()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=32768)
  p.add_argument("--rows", type=int, default=4, help="rows per loader batch")
  p.add_argument("--batches", type=int, default=20, help="timed loader batches")
  p.add_argument("--workers", default="0,2", help="loader worker counts to time")
  p.add_argument("--prepare_workers", type=int, default=2)
  p.add_argument("--repeat", type=int, default=1, help="copies of the built-in split in the 1x corpus")
  p.add_argument("--step_batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--rss_child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.rss_child:
    return rss_child(args.rss_child, args.length, args.rows, args.batches)
  split = "train"
  if args.quick:
    split, args.length, args.batches, args.steps, args.workers = "valid", 2048, 5, 1, "0"
  with tempfile.TemporaryDirectory() as tmp:
    small, large = os.path.join(tmp, "x1"), os.path.join(tmp, "x10")
    rate = prepare_repeated(small, split, args.repeat, args.prepare_workers)
    prepare_repeated(large, split, 10 * args.repeat, args.prepare_workers)
    n1, n10 = (records.Records(d).manifest for d in (small, large))
    print(f"corpus: builtin:{split} x{args.repeat}: {n1['documents']} documents, {n1['tokens'] / 1e6:.1f}M tokens; "
          f"10x: {n10['tokens'] / 1e6:.1f}M tokens; prepare {rate / 1e6:.2f}M tokens/s "
          f"({args.prepare_workers} workers, {os.cpu_count()} CPUs)")
    loads = {w: loader_rate(small, args.length, args.rows, args.batches, w) for w in map(int, args.workers.split(","))}
    step = step_rate(args.length, args.step_batch, args.steps)
    for w, r in loads.items():
      print(f"loader, {w} workers: {r / 1e6:.2f}M tokens/s at {args.rows} x {args.length} "
            f"({r / step:.0f}x the train step)")
    print(f"train step (built-in model, blockwise attention, batch {args.step_batch} x {args.length}): "
          f"{step:.0f} tokens/s")
    rss1, rss10 = (peak_rss(d, args.length, args.rows, args.batches) for d in (small, large))
    print(f"loader peak RSS: {rss1:.0f} MiB (1x), {rss10:.0f} MiB (10x): ratio {rss10 / rss1:.3f}")


if __name__ == "__main__":
  main()
