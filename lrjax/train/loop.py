"""The training loop: stages in order, each from the previous one's params with a fresh optimizer and data
order, checkpointed with orbax (params, optimizer, step, RNG, data position), resumable, preemption-safe.

Multi-process runs (lrjax.distributed) need nothing else: every process runs this same loop on its own devices,
reads only the batch shards they own (lrjax.train.feed), and saves collectively. A preemption notice (SIGTERM
to any process) is agreed on through jax's preemption sync point, so every process saves the same step and
exits; in a single process SIGTERM is caught directly. Only process 0 writes metrics and exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lrjax import checkpoint as checkpoint_lib
from lrjax import model as model_lib
from lrjax import report as report_lib
from lrjax import sharding as sharding_lib
from lrjax import weights
from lrjax.train import feed as feed_lib
from lrjax.train import metrics as metrics_lib
from lrjax.train import optim, step as step_lib
from lrjax.train.config import (NonFiniteError, Stage, TrainError, model_config, parse_stages,
                                    validate_config)

_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rope_theta", "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings",
                "qkv_bias")


class Preemption:
  """When to stop and save: jax's preemption sync point across processes, SIGTERM in a single process."""

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.requested, self._old = False, None

  def __enter__(self):
    if not self.multi:  # jax's own notifier handles SIGTERM when several processes run
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, SIGTERM keeps its default
        self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (every process must ask at every step)."""
    if self.multi:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class _Run:
  """Everything the stages of one run share."""

  config: Any
  workdir: str
  report: Callable[[str], None]
  model_cfg: model_lib.ModelConfig
  stages: list[Stage]
  mesh: Any
  optimizers: list
  state_sh: Any
  ckpt: checkpoint_lib.Checkpointer
  components: list
  log: metrics_lib.MetricsLog | None
  peak: float
  bar: Any
  config_json: dict
  losses: list = dataclasses.field(default_factory=list)
  last_saved: int = -1


def balance_order(model_cfg: model_lib.ModelConfig, mesh) -> str:
  """Causal load balancing for ring attention: zig-zag whenever the ring has more than one device (without
  it the last device does ~2N-1 times the first one's attention work and every step waits for it)."""
  ring = model_cfg.attention.startswith("ring") and mesh.shape.get(sharding_lib.SEQUENCE_AXIS, 1) > 1
  return "zigzag" if ring else "none"


def _initial_params(config, model_cfg: model_lib.ModelConfig, key: jax.Array, mesh, shardings):
  """Random parameters, or those of `config.init` (HF safetensors are read straight into their shardings, each
  process reading only its slices), whose architecture must equal config.model's."""
  if not config.init:
    return jax.jit(lambda k: model_lib.init_params(model_cfg, k), out_shardings=shardings)(key)
  path = weights.model_path(config.init)
  try:
    if weights.checkpoint_format(path) == "hf" and (epath.Path(path) / "config.json").exists():
      loaded_cfg, params = weights.load_sharded(path, mesh, dtype=model_cfg.param_dtype)
    else:
      loaded_cfg, params = weights.load(path, dtype=model_cfg.param_dtype)
  except (ValueError, OSError) as e:
    raise TrainError(f"config.init {config.init!r}: {str(e).splitlines()[0]}") from e
  diff = [f"{f}={getattr(loaded_cfg, f)!r} (config.model: {getattr(model_cfg, f)!r})" for f in _ARCH_FIELDS
          if getattr(loaded_cfg, f) != getattr(model_cfg, f)]
  if diff:
    raise TrainError(f"config.init {config.init!r} does not match config.model: {'; '.join(diff)}")
  return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)


def export_hf(directory: str, model_cfg: model_lib.ModelConfig, params, stage: Stage) -> None:
  """Write params as a Hugging Face directory (process 0, after gathering; the others wait); a non-default
  stage rope goes into config.json with max_position_embeddings = max(the model's, the stage length)."""
  host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else \
      jax.device_get(params)
  if jax.process_index() == 0:
    scaling = None if stage.rope.method == "default" else stage.rope
    cfg = model_cfg.replace(max_position_embeddings=max(model_cfg.max_position_embeddings, stage.length),
                            original_max_position_embeddings=model_cfg.original_length)
    weights.save_hf(directory, cfg, host, rope_scaling=scaling, dtype="float32")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("lrjax.train.export_hf")


def _stage_at(stages, step: int) -> tuple[int, int]:
  """(stage index, steps already done in it) for a global step count."""
  start = 0
  for s in stages:
    if step < start + s.steps:
      return s.index, step - start
    start += s.steps
  return len(stages), 0


def _setup(config, workdir: str, report) -> tuple[_Run, Any, int, dict | None]:
  """Validates everything up front, then restores the newest checkpoint or initialises."""
  validate_config(config)
  if not workdir:
    raise TrainError("--workdir is required")
  model_cfg = model_config(config)
  stages = parse_stages(config, model_cfg)
  if config.get("export_hf") and stages[-1].rope.method == "longrope" and stages[-1].rope.n_hat:
    raise TrainError(f"export_hf: a Hugging Face config cannot express n_hat={stages[-1].rope.n_hat} of the last "
                     "stage's factors; export with experiments/convert.py --allow_dropping_n_hat instead")
  export = config.get("export_hf")
  if export and epath.Path(export).exists() and list(epath.Path(export).iterdir()):
    raise TrainError(f"export_hf {export!r} exists and is not empty; choose a new directory")
  mesh = sharding_lib.make_mesh(config.mesh)
  for s in stages:
    feed_lib.check_batch(config.batch_size, config.accumulation, mesh)
    sharding_lib.validate(mesh, batch=config.batch_size // config.accumulation, length=s.length,
                          config=model_cfg, order=balance_order(model_cfg, mesh))
  tokenizer = weights.model_tokenizer(config.init or "builtin", config.data.tokenizer)
  components = feed_lib.components(config.data, tokenizer)
  key = jax.random.PRNGKey(config.seed)
  optimizers = [optim.make_optimizer(config.optimizer, s) for s in stages]
  abstract = jax.eval_shape(lambda k: step_lib.init_state(model_cfg, optimizers[0], k), key)
  with sharding_lib.mesh_context(mesh):
    state_sh = step_lib.state_shardings(mesh, abstract, optimizers[0])
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  ckpt = checkpoint_lib.Checkpointer(str(epath.Path(workdir) / "checkpoints"), keep=config.keep_checkpoints,
                                     async_save=config.async_checkpoints)
  restored = ckpt.restore_latest(target, report=report)
  if restored is None:
    params = _initial_params(config, model_cfg, key, mesh, state_sh.params)
    state = jax.jit(lambda p, k: step_lib.init_state(model_cfg, optimizers[0], k, p), out_shardings=state_sh)(
        params, key)
    start, data_state = 0, None
    report(f"starting from {'scratch' if not config.init else config.init}: "
           f"{model_cfg.num_params() / 1e6:.2f}M parameters")
  else:
    start, state, data_state = restored
    report(f"resumed from {ckpt.directory}/{start}")
  peak = float(config.peak_flops) or (step_lib.measure_peak_flops() if jax.default_backend() == "cpu" else 0.0)
  main_process = jax.process_index() == 0
  run = _Run(config=config, workdir=workdir, report=report, model_cfg=model_cfg, stages=stages, mesh=mesh,
             optimizers=optimizers, state_sh=state_sh, ckpt=ckpt, components=components,
             log=metrics_lib.MetricsLog(workdir, start) if main_process else None, peak=peak, bar=None,
             config_json=json.loads(config.to_json_best_effort()), last_saved=start)
  return run, state, start, data_state


def _record(run: _Run, stage: Stage, pending: tuple, elapsed: float) -> None:
  """Fetches a finished step's metrics (one step behind the dispatch) and logs them."""
  step_no, metrics = pending
  m = jax.device_get(metrics)
  if not m["finite"]:
    msg = (f"step {step_no}: non-finite loss {m['loss']} or gradient norm {m['grad_norm']}; params and optimizer "
           "state left unchanged")
    if run.config.nan_policy == "stop":
      raise NonFiniteError(msg + "; stopping (nan_policy='stop')")
    run.report(msg + " (nan_policy='skip')")
  tps = run.config.batch_size * stage.length / elapsed if elapsed > 0 else float("nan")
  fpt = step_lib.flops_per_token(run.model_cfg, stage.length)
  row = {"step": step_no, "stage": stage.index, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
         "lr": float(m["lr"]), "tokens": float(m["tokens"]), "tokens_per_s": tps,
         "mfu": tps * fpt / run.peak if run.peak else float("nan"), "skipped": int(not m["finite"]),
         "wall_time": time.time()}
  run.losses.append(row["loss"])
  if run.log is not None:
    run.log.write(row)
  run.bar.update(1)
  if step_no % run.config.log_every == 0:
    run.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tps:.0f}", mfu=f"{row['mfu']:.2f}" if run.peak else "n/a")


def _run_stage(run: _Run, state, stage: Stage, done: int, step: int, data_state: dict | None,
               preemption: Preemption):
  """Trains `stage` from its step `done`; returns (state, global step, data state, whether preempted)."""
  c = run.config
  optimizer = run.optimizers[stage.index]
  if done == 0 and stage.index > 0:  # a new stage: previous params, fresh optimizer and data order
    state = jax.jit(lambda s: s.replace(opt_state=optimizer.init(s.params)), out_shardings=run.state_sh,
                    donate_argnums=(0,))(state)
  if data_state is not None and data_state.get("stage") != stage.index:
    data_state = None
  feed = feed_lib.Feed(run.components, stage, run.mesh, step_lib.batch_sharding(run.mesh),
                       batch_size=c.batch_size, accumulation=c.accumulation, seed=c.seed + 1000 * stage.index,
                       order=balance_order(run.model_cfg, run.mesh), data_options=feed_lib.stream_options(c.data),
                       state=None if data_state is None else data_state["iterator"])
  rope = jax.tree.map(jnp.asarray, run.model_cfg.rope_arrays(stage.rope, seq_len=stage.length))
  step_fn = step_lib.jit_train_step(step_lib.make_train_step(run.model_cfg, optimizer, loss_chunk=c.loss_chunk,
                                                             schedule=optim.learning_rate_schedule(stage)),
                                    run.mesh, run.state_sh)
  run.report(f"stage {stage.index}: {stage.steps} steps at length {stage.length}, rope {stage.rope_name} "
             f"({stage.rope.method}), lr {stage.lr:g} {stage.schedule}, from step {done}")
  pending, t_last, preempted = None, time.perf_counter(), False
  try:
    while done < stage.steps:
      state, metrics = step_fn(state, next(feed), rope)
      done, step = done + 1, step + 1
      now = time.perf_counter()
      if pending is not None:
        _record(run, stage, pending, now - t_last)
        t_last = now
      pending = (step, metrics)
      preempted = preemption.reached(step)
      if preempted or step % c.checkpoint_every == 0 or done == stage.steps:
        run.ckpt.save(step, state, {"stage": stage.index, "iterator": feed.state()}, run.config_json, force=True)
        run.last_saved = step
      if preempted:
        break
    jax.block_until_ready(state)
    if pending is not None:
      _record(run, stage, pending, time.perf_counter() - t_last)
    return state, step, {"stage": stage.index, "iterator": feed.state()}, preempted
  finally:
    feed.close()


def describe(out: dict) -> str:
  """The line experiments/train.py prints at the end of a run."""
  return (f"done: step {out['step']}, loss {out['loss']:.4f} nats/token ({out['loss'] / math.log(2):.4f} bits), "
          f"skipped {out['skipped']}" + (" (preempted)" if out["preempted"] else ""))


def train(config: ml_collections.ConfigDict, workdir: str, *, report: Callable[[str], None] = print,
          progress: bool = True) -> dict:
  """Run (or resume) every stage of `config`, checkpointing into `workdir`.

  Returns:
    {"step", "loss" (mean of the last logged interval), "skipped", "preempted", "state"}.
  Raises:
    TrainError (and subclasses of ValueError from lrjax modules) with a one-line message for bad input.
  """
  run, state, step, data_state = _setup(config, workdir, report)
  preempted = False
  total = sum(s.steps for s in run.stages)
  try:
    with Preemption() as preemption, sharding_lib.mesh_context(run.mesh), report_lib.progress_bar(
        progress and jax.process_index() == 0, total=total, initial=step, desc="train") as run.bar:
      stage_index, done = _stage_at(run.stages, step)
      while stage_index < len(run.stages) and not preempted:
        state, step, data_state, preempted = _run_stage(run, state, run.stages[stage_index], done, step,
                                                        data_state, preemption)
        stage_index, done = stage_index + 1, 0
      if preempted:
        why = "preemption notice (all processes)" if preemption.multi else "SIGTERM received"
        report(f"{why}: saved checkpoint at step {step}; exiting")
  finally:
    run.ckpt.close()
    if run.log is not None:
      run.log.close()
  if run.log is not None and run.losses:
    metrics_lib.plot_metrics(workdir)
  if config.get("export_hf") and not preempted:
    export_hf(config.export_hf, run.model_cfg, state.params, run.stages[-1])
    report(f"exported the final parameters to {config.export_hf} (Hugging Face format)")
  tail = run.losses[-config.log_every:]
  return {"step": step, "loss": float(np.mean(tail)) if tail else float("nan"),
          "skipped": int(jax.device_get(state.skipped)), "preempted": preempted, "state": state}
