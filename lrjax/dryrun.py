"""Dry runs: build and compile every sharded program of a config with abstract arrays, no weights.

A paper-scale run (LLaMA2-7B at 128k-2048k tokens on a TPU pod or 8 GPUs) should fail on a laptop in a
minute, not on the pod after an hour. `dry_run_train` lowers and compiles each training stage's step, and
`dry_run_eval` the perplexity program at each length, on simulated CPU devices laid out as the config's mesh,
then reads XLA's per-device memory analysis and FLOP count. Nothing is allocated: inputs are
ShapeDtypeStructs carrying their shardings.

The device count must equal the mesh size, and XLA fixes it at start-up: `run_in_subprocess` starts a fresh
Python with `--xla_force_host_platform_device_count` set to the mesh size (the experiment scripts call it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from lrjax import model as model_lib
from lrjax import perplexity
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib
from lrjax import train as train_lib
from lrjax.search import fitness as fitness_lib
from lrjax.train import feed as feed_lib
from lrjax.train import optim

GiB = 1024 ** 3


class DryRunError(ValueError):
  """A layout that does not fit or cannot be built; the message names the program and the numbers."""


def mesh_devices(mesh_config) -> int:
  """Devices a mesh config needs; every axis must be explicit (a dry run has no real device count)."""
  sizes = {k: int(v) for k, v in dict(mesh_config).items()}
  if any(v < 1 for v in sizes.values()):
    raise DryRunError(f"dry run needs explicit mesh sizes (no -1): {sizes}")
  return math.prod(sizes.values())


def fit_to_devices(config: ml_collections.ConfigDict, max_devices: int) -> tuple[ml_collections.ConfigDict, str]:
  """Shrinks a train config's pure data-parallel axis (and its global batch with it) to fit max_devices.

  Devices along `data` hold identical replicas with identical per-device shapes, so the per-device program of
  a data=4 pod layout equals that of its data=1 slice: a laptop can check a pod layout's memory exactly.
  Returns (config, note); raises DryRunError when the other axes alone exceed max_devices.
  """
  sizes = {k: int(v) for k, v in dict(config.mesh).items()}
  total = mesh_devices(config.mesh)
  if total <= max_devices:
    return config, ""
  other = total // sizes.get("data", 1)
  if other > max_devices or total % max_devices or sizes.get("data", 1) % (total // max_devices):
    raise DryRunError(f"mesh {sizes} ({total} devices) cannot be checked on {max_devices} simulated devices: "
                      "only the data axis can shrink")
  k = total // max_devices
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh.data = sizes["data"] // k
  if c.batch_size % k:
    raise DryRunError(f"batch_size {c.batch_size} is not divisible by the data-axis reduction {k}")
  c.batch_size //= k
  return c, (f"simulating {max_devices} of {total} devices: data axis {sizes['data']} -> {c.mesh.data}, "
             f"global batch / {k}; the per-device program is unchanged")


def _abstract(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_rope(model_cfg: model_lib.ModelConfig, sharding) -> rope_lib.RopeArrays:
  half = model_cfg.rotary_dim // 2
  return rope_lib.RopeArrays(inv_freq=_abstract((model_cfg.num_layers, half), jnp.float32, sharding),
                             base_inv_freq=_abstract((half,), jnp.float32, sharding),
                             mscale=_abstract((), jnp.float32, sharding),
                             n_hat=_abstract((), jnp.int32, sharding))


def _analyse(name: str, compiled, *, tokens: int, flops: float, devices: int, seconds: float,
             memory_budget: float) -> dict:
  """Per-device memory from XLA's buffer assignment; FLOPs from the model formula (XLA's cost analysis
  counts a loop body once, so it undercounts scanned layers and blockwise attention)."""
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
  row = {"program": name, "tokens": tokens, "per_device_bytes": int(per_device),
         "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes), "flops_per_device": flops / devices,
         "compile_seconds": seconds, "fits": memory_budget <= 0 or per_device <= memory_budget}
  return row


def dry_run_train(config: ml_collections.ConfigDict, *, memory_budget: float) -> list[dict]:
  """Compile every stage's train step on the config's mesh (simulated devices), exactly the jitted function
  lrjax.train's loop calls (same builder, same shardings), with abstract arguments; one row per stage."""
  model_cfg = train_lib.model_config(config).replace(token_layout="bt")  # the accelerators' layout, not the CPU's
  stages = train_lib.parse_stages(config, model_cfg)
  mesh = sharding_lib.make_mesh(config.mesh)
  keys = feed_lib.batch_keys(feed_lib.stream_options(config.data))
  rows = []
  for stage in stages:
    micro = config.accumulation
    b = config.batch_size // micro
    feed_lib.check_batch(config.batch_size, micro, mesh)
    sharding_lib.validate(mesh, batch=b, length=stage.length, config=model_cfg,
                          order=train_lib.balance_order(model_cfg, mesh))
    optimizer = train_lib.make_optimizer(config.optimizer, stage)
    abstract = jax.eval_shape(lambda k: train_lib.init_state(model_cfg, optimizer, k), jax.random.PRNGKey(0))
    with sharding_lib.mesh_context(mesh):
      state_sh = train_lib.state_shardings(mesh, abstract, optimizer)
      state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), abstract, state_sh)
      batch_sh = train_lib.batch_sharding(mesh)
      dtypes = {"weights": jnp.float32, "original_rope": jnp.bool_}
      batch = {k: _abstract((micro, b, stage.length), dtypes.get(k, jnp.int32), batch_sh) for k in keys}
      rope = _abstract_rope(model_cfg, NamedSharding(mesh, P()))
      step = train_lib.jit_train_step(
          train_lib.make_train_step(model_cfg, optimizer, loss_chunk=config.loss_chunk,
                                    schedule=optim.learning_rate_schedule(stage)), mesh, state_sh)
      start = time.time()
      compiled = step.lower(state, batch, rope).compile()
    tokens = b * stage.length  # one microbatch: the compiled program
    rows.append(_analyse(f"train stage {stage.index} ({stage.length} tokens x {b})", compiled, tokens=tokens,
                         flops=tokens * train_lib.flops_per_token(model_cfg, stage.length),
                         devices=mesh.size, seconds=time.time() - start, memory_budget=memory_budget))
  return rows


def _abstract_params(model_cfg: model_lib.ModelConfig, mesh, rules=None):
  params_abs = jax.eval_shape(lambda k: model_lib.init_params(model_cfg, k), jax.random.PRNGKey(0))
  p_sh = sharding_lib.param_shardings(mesh, params_abs, rules)
  return jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), params_abs, p_sh)


def dry_run_eval(model_cfg: model_lib.ModelConfig, mesh_config, *, lengths, batch: int,
                 memory_budget: float, candidates: int = 0) -> list[dict]:
  """Compile, per length, the program the real run calls: lrjax.perplexity.compiled_window_nll (evaluation) or,
  with candidates > 0, the search's fitness program (lrjax.search.fitness.make_nll_fn), under the mesh."""
  mesh = sharding_lib.make_mesh(mesh_config)
  model_cfg = model_cfg.replace(token_layout="bt")  # the accelerators' layout, not the CPU's
  rows = []
  for length in lengths:
    replicated = NamedSharding(mesh, P())
    rope = _abstract_rope(model_cfg, replicated)
    if candidates:
      fn = fitness_lib.make_nll_fn(model_cfg, candidates=candidates, mesh=mesh)
      rows_axis = "fsdp" if "fsdp" in mesh.axis_names else None
      params = _abstract_params(model_cfg, mesh, fitness_lib.fitness_rules(mesh))
      tokens = _abstract((batch, length), jnp.int32, NamedSharding(mesh, P(rows_axis, sharding_lib.SEQUENCE_AXIS)))
      c_sh = NamedSharding(mesh, P("data" if candidates > 1 else None))
      rope = jax.tree.map(lambda a: _abstract((candidates,) + a.shape, a.dtype, c_sh), rope) \
          if candidates > 1 else rope
      args = (params, tokens, None, rope)
    else:
      sharding_lib.validate(mesh, batch=batch, length=length, config=model_cfg)
      fn = perplexity.compiled_window_nll(model_cfg, mesh)
      params = _abstract_params(model_cfg, mesh)
      tokens = _abstract((batch, length), jnp.int32, sharding_lib.batch_sharding(mesh))
      weights = _abstract((batch, length - 1), jnp.float32, NamedSharding(mesh, P(sharding_lib.batch_spec(mesh)[0])))
      args = (params, tokens, rope, weights)
    start = time.time()
    compiled = fn.lower(*args).compile()
    what = f"fitness x{candidates}" if candidates else "perplexity"
    # Forward only: a third of the training FLOPs per token, per candidate.
    flops = batch * length * train_lib.flops_per_token(model_cfg, length) / 3 * max(candidates, 1)
    rows.append(_analyse(f"{what} at {length} tokens x {batch}", compiled, tokens=batch * length, flops=flops,
                         devices=mesh.size, seconds=time.time() - start, memory_budget=memory_budget))
  return rows


def format_rows(rows: list[dict], memory_budget: float) -> str:
  for r in rows:
    r["fits"] = memory_budget <= 0 or r["per_device_bytes"] <= memory_budget
  lines = [f"{'program':<44} {'GiB/device':>10} {'TFLOP/device':>13} {'compile s':>9}  fits "
           f"{memory_budget / GiB:.0f} GiB"]
  for r in rows:
    lines.append(f"{r['program']:<44} {r['per_device_bytes'] / GiB:>10.2f} {r['flops_per_device'] / 1e12:>13.2f} "
                 f"{r['compile_seconds']:>9.1f}  {'yes' if r['fits'] else 'NO'}")
  return "\n".join(lines)


def check(rows: list[dict], memory_budget: float) -> None:
  for r in rows:
    r["fits"] = memory_budget <= 0 or r["per_device_bytes"] <= memory_budget
  bad = [r for r in rows if not r["fits"]]
  if bad:
    r = bad[0]
    raise DryRunError(f"{r['program']} needs {r['per_device_bytes'] / GiB:.1f} GiB per device, more than the "
                      f"{memory_budget / GiB:.0f} GiB available; shard further (mesh), lower the batch or raise "
                      "remat")


def run_in_subprocess(kind: str, payload: dict, devices: int, *, timeout: float = 3600) -> list[dict]:
  """Runs `python -m lrjax.dryrun KIND` with `devices` simulated CPU devices; returns its rows."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get(
      "PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-m", "lrjax.dryrun", kind], input=json.dumps(payload), text=True,
                        capture_output=True, env=env, timeout=timeout)
  if proc.returncode:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    raise DryRunError(lines[-1].removeprefix("error: ") if lines else f"dry run exited with {proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def train_main(config: ml_collections.ConfigDict, *, max_devices: int = 8) -> str:
  """experiments/train.py --config.dry_run=True: every stage's step on the config's mesh; returns the report.

  Stages naming a factor file that is not here use linear scaling instead (same shapes, same program).
  Raises DryRunError when a program does not fit config.device_memory_gb (0 = no check).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  budget = float(c.get("device_memory_gb", 0.0)) * GiB
  notes = []
  for stage in c.stages:
    rope = str(stage.rope)
    if rope not in rope_lib.METHODS and not os.path.exists(rope):
      notes.append(f"stage factor file {rope} is not here; compiled with linear scaling (same program)")
      stage.rope = "linear"
  c, note = fit_to_devices(c, max_devices)
  if note:
    notes.append(note)
  for key in ("dry_run", "device_memory_gb", "export_hf"):
    if key in c:
      del c[key]
  rows = run_in_subprocess("train", {"config": json.loads(c.to_json_best_effort())}, mesh_devices(c.mesh))
  text = format_rows(rows, budget) + "".join(f"\nnote: {n}" for n in notes)
  check(rows, budget)
  return text


def search_main(config: ml_collections.ConfigDict) -> str:
  """experiments/search.py --config.dry_run=True: the fitness program at each searched length on config.mesh
  (the search's own mesh), with config.layout's architecture and device memory and abstract weights."""
  layout = config.layout
  if not layout.model:
    raise DryRunError("config.layout.model (the architecture) is needed for a dry run")
  lengths = [int(n) for n in config.short_lengths] if config.stage == "short" else [
      int(config.search.target_length)]
  model = dict(layout.model.to_dict(), dtype=config.dtype, attention=config.attention, block_q=config.block_q,
               block_k=config.block_k)
  payload = {"model": model, "mesh": config.mesh.to_dict(), "lengths": lengths,
             "batch": int(config.search.doc_batch), "candidates": int(config.search.candidates_per_call)}
  budget = float(layout.device_memory_gb) * GiB
  rows = run_in_subprocess("eval", payload, mesh_devices(config.mesh))
  check(rows, budget)
  return format_rows(rows, budget)


def _main(kind: str) -> None:
  payload = json.loads(sys.stdin.read())
  if kind == "train":
    rows = dry_run_train(ml_collections.ConfigDict(payload["config"]), memory_budget=0)
  else:
    rows = dry_run_eval(model_lib.ModelConfig(**payload["model"]), payload["mesh"], lengths=payload["lengths"],
                        batch=payload["batch"], memory_budget=0, candidates=payload["candidates"])
  print(json.dumps(rows))


if __name__ == "__main__":
  try:
    _main(sys.argv[1])
  except ValueError as e:  # lrjax's errors are ValueError subclasses with one-line messages
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
