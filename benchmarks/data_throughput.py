"""Input-pipeline throughput and memory: lrjax.stream over prepared records vs what a train step consumes.

  python benchmarks/data_throughput.py [--length 32768] [--rows 4] [--batches 20] [--workers 0,2] [--quick]

1. Prepares the built-in corpus (builtin:train) repeated `--repeat` times, and a 10x larger copy, with
   lrjax.records (byte tokenizer, `--prepare_workers` tokenizing processes); prints prepare tokens/s.
2. Loader: tokens/s of `stream.batches` (reset positions and document masks on) at `--length`-token rows,
   `--rows` rows per batch, for each worker count; the first batch (which starts the workers) is not timed.
3. Consumption: tokens/s of the train step of the default fine-tuning config (configs/finetune.py:tiny: the
   built-in model at 2048 tokens, batch 4, its attention, mesh and data options), fed batches from the same
   records; the median of `--steps` steps after one compiling step. The issue's target: loader >= 10x.
4. Memory: peak RSS (VmHWM) of a fresh process that opens the records and reads `--batches` batches
   (num_workers=0), for the 1x and the 10x corpus; the loader holds only per-document index data, so the two
   should agree within 10%. Not timings: never withheld on a busy machine.
--quick: builtin:valid, 2048-token rows, 5 batches, 1 step, workers 0 (a smoke run, not figures to publish).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import harness  # first: puts the repository root on sys.path

from lrjax import data, records, stream

STREAM_OPTIONS = dict(reset_positions=True, document_mask=True)


def prepare_repeated(out: str, split: str, repeat: int, workers: int) -> tuple[dict, harness.Timing]:
  """Prepare builtin:SPLIT repeated `repeat` times into `out`; (manifest, timing of the prepare)."""
  src = out + ".jsonl"
  with open(src, "w") as f:
    for r in range(repeat):
      for doc in data.documents(f"builtin:{split}"):
        f.write(json.dumps({"id": f"{r}/{doc.id}", "text": doc.text}) + "\n")
  with harness.timed() as timing:
    manifest = records.prepare(src, out, shard_documents=64, num_workers=workers, progress=False)
  os.remove(src)
  return manifest, timing


def _batches(path: str, length: int, rows: int, **options) -> stream.Batches:
  return stream.batches([stream.Component(records.Records(path))], length=length, global_batch=rows, seed=0,
                        **options)


def loader_rate(path: str, length: int, rows: int, batches: int, workers: int) -> tuple[float, harness.Timing]:
  """(tokens/s, timing) of the loader after its first batch."""
  with _batches(path, length, rows, num_workers=workers, **STREAM_OPTIONS) as it:
    next(it)
    with harness.timed() as timing:
      for _ in range(batches):
        next(it)
  return batches * rows * length / timing.wall_s, timing


def step_rate(path: str, steps: int) -> tuple[float, harness.Timing, str]:
  """(tokens/s, median step timing, description) of configs/finetune.py:tiny's train step on loader batches."""
  import jax
  import jax.numpy as jnp

  from configs import finetune
  from lrjax import sharding as sharding_lib
  from lrjax import train
  from lrjax.train import feed as feed_lib

  c = finetune.get_config("tiny")
  cfg = train.model_config(c)
  stage = train.parse_stages(c, cfg)[0]
  optimizer = train.make_optimizer(c.optimizer, stage)
  mesh = sharding_lib.make_mesh(c.mesh)
  options = feed_lib.stream_options(c.data)
  keys = feed_lib.batch_keys(options)
  with sharding_lib.mesh_context(mesh):
    state = train.init_state(cfg, optimizer, jax.random.PRNGKey(0))
    sh = train.state_shardings(mesh, jax.eval_shape(lambda: state), optimizer)
    step = train.jit_train_step(train.make_train_step(cfg, optimizer, loss_chunk=c.loss_chunk), mesh, sh)
    rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(stage.rope, seq_len=stage.length))
    state = jax.device_put(state, sh)
    timings = []
    with _batches(path, stage.length, c.batch_size, **options) as it:
      for i in range(steps + 1):  # the first call compiles
        batch = jax.device_put({k: v[None] for k, v in next(it).items() if k in keys},
                               train.batch_sharding(mesh))
        with harness.timed() as timing:
          state, metrics = step(state, batch, rope)
          jax.block_until_ready(metrics["loss"])
        if i:
          timings.append(timing)
  median = harness.median_timing(timings)
  what = (f"finetune.py:tiny train step: {c.batch_size} x {stage.length} tokens, attention {cfg.attention}, "
          f"{cfg.num_params() / 1e6:.2f}M params, {len(jax.devices())} device(s)")
  return c.batch_size * stage.length / median.wall_s, median, what


def rss_child(path: str, length: int, rows: int, batches: int) -> None:
  """(In a fresh process) read `batches` batches; print the peak RSS in MiB."""
  with _batches(path, length, rows, **STREAM_OPTIONS) as it:
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
  p.add_argument("--split", default="train", help="the built-in split to prepare")
  p.add_argument("--length", type=int, default=32768, help="tokens per loader row")
  p.add_argument("--rows", type=int, default=4, help="rows per loader batch")
  p.add_argument("--batches", type=int, default=20, help="timed loader batches")
  p.add_argument("--workers", default="0,2", help="loader worker counts to time")
  p.add_argument("--prepare_workers", type=int, default=2)
  p.add_argument("--repeat", type=int, default=1, help="copies of the built-in split in the 1x corpus")
  p.add_argument("--steps", type=int, default=2, help="timed train steps (after one compiling step)")
  p.add_argument("--rss_child", default="", help=argparse.SUPPRESS)
  args = harness.parse_args(p, quick=dict(split="valid", length=2048, batches=5, steps=1, workers="0"))
  if args.rss_child:
    return rss_child(args.rss_child, args.length, args.rows, args.batches)
  bench = harness.Bench.start("data_throughput", args)
  with tempfile.TemporaryDirectory() as tmp:
    small, large = os.path.join(tmp, "x1"), os.path.join(tmp, "x10")
    n1, prep = prepare_repeated(small, args.split, args.repeat, args.prepare_workers)
    n10, _ = prepare_repeated(large, args.split, 10 * args.repeat, args.prepare_workers)
    print(f"corpus: builtin:{args.split} x{args.repeat}: {n1['documents']} documents, {n1['tokens'] / 1e6:.2f}M "
          f"tokens; 10x: {n10['documents']} documents, {n10['tokens'] / 1e6:.2f}M tokens; prepare (1x): {prep}")
    bench.figure(f"prepare, {args.prepare_workers} workers", n1["tokens"] / prep.wall_s / 1e6, "M tokens/s",
                 fmt=".2f")
    loads = {}
    for w in map(int, args.workers.split(",")):
      loads[w], timing = loader_rate(small, args.length, args.rows, args.batches, w)
      print(f"loader, {w} workers, {args.rows} x {args.length}: {timing}")
      bench.figure(f"loader, {w} workers, {args.rows} x {args.length}-token rows", loads[w] / 1e6, "M tokens/s",
                   fmt=".2f")
    step, timing, what = step_rate(small, args.steps)
    print(f"{what}: {timing} per step")
    bench.figure(what, step, "tokens/s", fmt=".0f")
    for w, rate in loads.items():
      bench.ratio(f"loader ({w} workers) / train step (tokens/s; target >= 10x)", rate / step, fmt=".0f")
    rss1, rss10 = (peak_rss(d, args.length, args.rows, args.batches) for d in (small, large))
    bench.figure(f"loader peak RSS, 1x corpus ({n1['tokens'] / 1e6:.1f}M tokens)", rss1, "MiB", timed=False,
                 fmt=".0f")
    bench.figure(f"loader peak RSS, 10x corpus ({n10['tokens'] / 1e6:.1f}M tokens)", rss10, "MiB", timed=False,
                 fmt=".0f")
    bench.ratio("peak RSS 10x / 1x (target within 10%)", rss10 / rss1, timed=False, fmt=".3f")
  bench.finish()


if __name__ == "__main__":
  main()
