"""Training and fine-tuning: one jitted, sharded, donated train step and a resumable multi-stage loop.

The step (`make_train_step`): forward to final hidden states, `lrjax.loss.chunked_nll` (no [b, t, V] logits),
gradients of sum(NLL) / sum(weights) over all microbatches (gradient accumulation is an inner lax.scan, so
the accumulated gradient is exactly the full-batch gradient), AdamW with warmup and a linear / cosine /
constant schedule, global-norm clipping, and a NaN/inf guard that leaves params and optimizer state unchanged
when the loss or gradient norm is not finite. Positions and the RoPE arrays are inputs: changing a factor set
or a stage's length never changes the compiled step's code, only its input shapes.

Stages (`config.stages`): a list of {length, steps, rope, rope_factor, lr, schedule, warmup_steps,
end_lr_ratio}. Each stage starts from the previous stage's final parameters with a fresh optimizer and a fresh
data order (seed + stage index); the paper's 128k -> 256k recipe is two stages.

Model FLOPs (for MFU), per trained token: 6 * N + 6 * L * t * (n * h), where N counts the matmul parameters
(every weight except the embedding table and the norms; a tied head counts once), L layers, t the sequence
length, n query heads, h head dim. 6 * L * t * n * h is the attention score and value matmuls (12 * L * t * n * h
for forward + backward) halved for causality.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lrjax import checkpoint as checkpoint_lib
from lrjax import loss as loss_lib
from lrjax import model as model_lib
from lrjax import packing
from lrjax import ring as ring_lib
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib

SCHEDULES = ("constant", "linear", "cosine")
NAN_POLICIES = ("skip", "stop")
CSV_FIELDS = ("step", "stage", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu", "skipped",
              "wall_time")


class TrainError(ValueError):
  """A training setting or input that cannot work; the message names the problem."""


class NonFiniteError(TrainError):
  """The loss or gradients became NaN/inf and the config says stop."""


@flax.struct.dataclass
class TrainState:
  """Everything that evolves during training (one pytree; checkpointed whole).

  params: model parameters (param_dtype). opt_state: optax state. step: i32[] optimizer steps taken in all
  stages together. rng: u32[2] PRNG key, split every step. skipped: i32[] steps skipped by the NaN guard.
  """

  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage. rope_name is what the config said (method name or factor file path)."""

  index: int
  length: int
  steps: int
  rope: rope_lib.RopeScaling
  rope_name: str
  lr: float
  schedule: str
  warmup_steps: int
  end_lr_ratio: float


# ----------------------------------------------------------------------------------------------------------
# Config.

_TOP_KEYS = {"seed", "model", "init", "data", "batch_size", "accumulation", "optimizer", "stages", "loss_chunk",
             "nan_policy", "mesh", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoints",
             "peak_flops", "export_hf", "dry_run", "device_memory_gb"}
_DATA_KEYS = {"source", "tokenizer", "separator"}
_OPT_KEYS = {"b1", "b2", "eps", "weight_decay", "grad_clip"}
_STAGE_KEYS = {"length", "steps", "rope", "rope_factor", "lr", "schedule", "warmup_steps", "end_lr_ratio"}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(model_lib.ModelConfig)} - {"rope_scaling"}


def _to_dict(c) -> dict:
  return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def _check_keys(where: str, got: Iterable[str], allowed: set, required: set = frozenset()) -> None:
  got = set(got)
  unknown, missing = sorted(got - allowed), sorted(required - got)
  if unknown:
    raise TrainError(f"unknown {where} keys {unknown} (nothing reads them); allowed: {sorted(allowed)}")
  if missing:
    raise TrainError(f"{where} is missing keys {missing}")


def model_config(config) -> model_lib.ModelConfig:
  """The ModelConfig of `config.model` (every key must be a ModelConfig field). Its original window is
  config.model's when given, else the one `config.init` declares (e.g. Mistral's 4096)."""
  m = _to_dict(config.model)
  _check_keys("config.model", m, _MODEL_FIELDS)
  init = config.get("init")
  if not m.get("original_max_position_embeddings") and init and (init == "builtin" or os.path.exists(init)):
    from lrjax import weights  # only to read the init checkpoint's declared window
    try:
      m["original_max_position_embeddings"] = weights.original_length_of(weights.model_path(config.init))
    except ValueError as e:
      raise TrainError(f"config.init {config.init!r}: {str(e).splitlines()[0]}") from e
  try:
    return model_lib.ModelConfig(**m)
  except (TypeError, ValueError) as e:
    raise TrainError(f"config.model: {e}") from e


def stage_rope(stage_cfg: dict, model_cfg: model_lib.ModelConfig) -> rope_lib.RopeScaling:
  """A stage's RopeScaling: a method name (with rope_factor) or a factor file path (lrjax.factors), resolved by
  the one rule (rope.resolve): L = the model's original window, and a factor table without its own target
  takes s = stage length / L (the extension ratio sets the attention temperature)."""
  length = int(stage_cfg["length"]) if "length" in stage_cfg else None
  name = str(stage_cfg.get("rope", "default"))
  original = model_cfg.original_length
  if name in rope_lib.METHODS and name != "longrope":
    if name == "default":
      return rope_lib.RopeScaling()
    return rope_lib.resolve(rope_lib.RopeScaling(method=name, factor=float(stage_cfg.get("rope_factor", 1.0))),
                            original_length=original)
  if name == "longrope":
    raise TrainError("a longrope stage needs a factor file path as `rope` (searched factors), not the name")
  if not os.path.exists(name):
    raise TrainError(f"stage rope {name!r} is neither a method ({', '.join(rope_lib.METHODS)}) nor an "
                     "existing factor file")
  from lrjax import factors  # a factor file only when asked for
  try:
    return factors.resolve_file(name, original_length=original, target_length=length,
                                n_layers=model_cfg.num_layers, rotary_dim=model_cfg.rotary_dim)
  except ValueError as e:
    raise TrainError(str(e).splitlines()[0]) from e


def parse_stages(config, model_cfg: model_lib.ModelConfig) -> list[Stage]:
  """Validate the whole stage list up front; every problem is one TrainError line naming the stage."""
  raw = list(config.stages)
  if not raw:
    raise TrainError("config.stages is empty; give at least one {length, steps, ...} stage")
  stages = []
  for i, s in enumerate(raw):
    s = _to_dict(s)
    _check_keys(f"config.stages[{i}]", s, _STAGE_KEYS, {"length", "steps", "lr"})
    length, steps = int(s["length"]), int(s["steps"])
    if steps <= 0:
      raise TrainError(f"stage {i}: steps must be > 0, got {steps}")
    if length <= 0:
      raise TrainError(f"stage {i}: length must be > 0, got {length}")
    block = max(1, min(model_cfg.block_q, length)) if model_cfg.attention == "blockwise" else 1
    if length % block:
      raise TrainError(f"stage {i}: length {length} is not divisible by the attention block "
                       f"{block} (config.model.block_q)")
    if length % config.loss_chunk and length > config.loss_chunk:
      raise TrainError(f"stage {i}: length {length} is not divisible by loss_chunk {config.loss_chunk}")
    schedule = s.get("schedule", "cosine")
    if schedule not in SCHEDULES:
      raise TrainError(f"stage {i}: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    warmup = int(s.get("warmup_steps", 0))
    if not 0 <= warmup < steps:
      raise TrainError(f"stage {i}: warmup_steps {warmup} must be in [0, steps={steps})")
    lr = float(s["lr"])
    if not lr > 0:
      raise TrainError(f"stage {i}: lr must be > 0, got {lr}")
    stages.append(Stage(index=i, length=length, steps=steps, rope=stage_rope(s, model_cfg),
                        rope_name=str(s.get("rope", "default")), lr=lr, schedule=schedule, warmup_steps=warmup,
                        end_lr_ratio=float(s.get("end_lr_ratio", 0.0))))
  return stages


def validate_config(config) -> None:
  """Unknown keys anywhere are errors (a value nothing reads is a silent bug); then simple range checks."""
  _check_keys("config", config.keys(), _TOP_KEYS, _TOP_KEYS - {"export_hf", "dry_run", "device_memory_gb"})
  if config.get("dry_run"):
    raise TrainError("config.dry_run is set: experiments/train.py runs lrjax.dryrun instead of training")
  _check_keys("config.data", config.data.keys(), _DATA_KEYS, {"source"})
  _check_keys("config.optimizer", config.optimizer.keys(), _OPT_KEYS)
  if config.nan_policy not in NAN_POLICIES:
    raise TrainError(f"nan_policy must be one of {NAN_POLICIES}, got {config.nan_policy!r}")
  for key in ("batch_size", "accumulation", "loss_chunk", "log_every", "checkpoint_every", "keep_checkpoints"):
    if int(config[key]) < 1:
      raise TrainError(f"config.{key} must be >= 1, got {config[key]}")
  if config.batch_size % config.accumulation:
    raise TrainError(f"batch_size {config.batch_size} is not divisible by accumulation {config.accumulation}")


# ----------------------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(stage: Stage) -> optax.Schedule:
  """Linear warmup from lr/warmup to lr over warmup_steps, then constant, linear or cosine decay to
  lr * end_lr_ratio at the stage's last step."""
  lr, warm, total, end = stage.lr, stage.warmup_steps, stage.steps, stage.end_lr_ratio
  decay = max(total - warm, 1)

  def schedule(count):
    # numpy for a host-side int (logging: no device dispatch), jnp when optax traces it
    xp = np if isinstance(count, (int, np.integer)) else jnp
    count = xp.asarray(count, xp.float32)
    frac = xp.clip((count - warm) / decay, 0.0, 1.0)
    if stage.schedule == "constant":
      main = xp.asarray(lr, xp.float32)
    elif stage.schedule == "linear":
      main = lr * (1.0 - (1.0 - end) * frac)
    else:
      main = lr * (end + (1.0 - end) * 0.5 * (1.0 + xp.cos(xp.pi * frac)))
    if warm:
      return xp.where(count < warm, lr * (count + 1.0) / warm, main).astype(xp.float32)
    return xp.asarray(main, xp.float32)

  return schedule


def _decay_mask(params):
  """Weight decay on weight matrices only (not on norms)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not str(getattr(path[-1], "key", path[-1])).endswith("norm"), params)


def make_optimizer(opt_cfg, stage: Stage) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with the stage's schedule."""
  o = _to_dict(opt_cfg)
  return optax.chain(
      optax.clip_by_global_norm(float(o.get("grad_clip", 1.0))),
      optax.adamw(learning_rate_schedule(stage), b1=float(o.get("b1", 0.9)), b2=float(o.get("b2", 0.95)),
                  eps=float(o.get("eps", 1e-8)), weight_decay=float(o.get("weight_decay", 0.0)),
                  mask=_decay_mask))


# ----------------------------------------------------------------------------------------------------------
# The step.


def loss_sums(model_cfg: model_lib.ModelConfig, params, batch: dict, rope: rope_lib.RopeArrays,
              loss_chunk: int) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted NLL in nats, sum of weights) of one batch {inputs, targets, positions, weights} [b, t]."""
  hidden = model_lib.forward(model_cfg, params, batch["inputs"], batch["positions"], rope)
  nll, count = loss_lib.chunked_nll(hidden, model_lib.head_weights(model_cfg, params), batch["targets"],
                                    batch["weights"], chunk=loss_chunk)
  return jnp.sum(nll), jnp.sum(count)


def make_train_step(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation, *,
                    loss_chunk: int = 2048) -> Callable:
  """The pure train step `step(state, batch, rope) -> (state, metrics)` (jit it with `jit_train_step`).

  batch: {inputs, targets, positions: i32[A, b, t], weights: f32[A, b, t]}: A microbatches whose gradients
  are summed before one optimizer update. metrics: {loss (nats/token), grad_norm, tokens, finite}.
  """

  def grad_sums(params, micro, rope):
    def f(p):
      return loss_sums(model_cfg, p, micro, rope, loss_chunk)
    (nll, count), grads = jax.value_and_grad(f, has_aux=True)(params)
    return nll, count, grads

  def step(state: TrainState, batch: dict, rope: rope_lib.RopeArrays):
    params = state.params
    n_micro = batch["inputs"].shape[0]
    if n_micro == 1:
      nll, count, grads = grad_sums(params, jax.tree.map(lambda x: x[0], batch), rope)
    else:
      def body(carry, micro):
        nll, count, grads = grad_sums(params, micro, rope)
        return jax.tree.map(jnp.add, carry, (nll, count, grads)), None
      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
      (nll, count, grads), _ = jax.lax.scan(body, zeros, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    loss = nll / denom
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(params=keep(new_params, params), opt_state=keep(opt_state, state.opt_state),
                           step=state.step + 1, rng=rng, skipped=state.skipped + (~finite).astype(jnp.int32))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}

  return step


def init_state(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation, key: jax.Array,
               params=None) -> TrainState:
  """A fresh TrainState (random params from `key` unless `params` is given)."""
  init_key, rng = jax.random.split(key)
  if params is None:
    params = model_lib.init_params(model_cfg, init_key)
  return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                    rng=rng, skipped=jnp.zeros((), jnp.int32))


def state_shardings(mesh, abstract_state: TrainState, optimizer: optax.GradientTransformation) -> TrainState:
  """NamedShardings of a TrainState: params by lrjax.sharding's rules, optimizer moments like their params,
  everything else replicated."""
  replicated = NamedSharding(mesh, P())
  params = sharding_lib.param_shardings(mesh, abstract_state.params)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, params,
                              transform_non_params=lambda _: replicated)
  return TrainState(params=params, opt_state=opt, step=replicated, rng=replicated, skipped=replicated)


def batch_shardings(mesh) -> NamedSharding:
  """Sharding of [A, b, t] batch arrays: microbatch axis replicated, then lrjax.sharding's batch spec."""
  return NamedSharding(mesh, P(None, *sharding_lib.batch_spec(mesh)))


def jit_train_step(step: Callable, mesh, state_sh: TrainState) -> Callable:
  """jax.jit with explicit shardings and the state donated (updated in place)."""
  replicated = NamedSharding(mesh, P())
  batch_sh = batch_shardings(mesh)
  return jax.jit(step, in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------------------
# Data.


def load_documents(data_cfg) -> tuple[list, dict]:
  """Token arrays of every document of `data_cfg.source` (lrjax.data) and the bookends {bos, eos, separator}
  that lrjax.packing puts around each (see its docstring: the tokenizer's BOS/EOS, else the separator)."""
  from lrjax import data as data_lib
  from lrjax import tokenizers
  d = _to_dict(data_cfg)
  source, spec = str(d["source"]), str(d.get("tokenizer", "byte"))
  tok = tokenizers.load_tokenizer(spec)
  docs = data_lib.tokenized_documents(source, tok, add_bos=False)  # packing adds the bookends
  bos, eos = tok.bos_id, tok.eos_id
  separator = d.get("separator", None)
  if separator is None:
    separator = () if eos is not None else (0,)
  return docs, {"bos": bos, "eos": eos, "separator": tuple(int(s) for s in separator)}


# ----------------------------------------------------------------------------------------------------------
# FLOPs and logging.


def flops_per_token(model_cfg: model_lib.ModelConfig, length: int) -> float:
  """Training FLOPs per token (see the module docstring)."""
  c = model_cfg
  matmul = c.num_params() - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
  matmul -= c.num_layers * 2 * c.hidden_size + c.hidden_size  # norms
  return 6.0 * matmul + 6.0 * c.num_layers * length * c.num_heads * c.head_dim


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted f32 [n, n] @ [n, n] matmuls on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


class MetricsLog:
  """metrics.csv plus TensorBoard events in the workdir (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    from lrjax import tb
    self.path = os.path.join(workdir, "metrics.csv")
    rows = []
    if os.path.exists(self.path):  # keep rows up to the restored step; later ones will be recomputed
      with open(self.path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, CSV_FIELDS)
      w.writeheader()
      w.writerows(rows)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", newline="")
    self._csv = csv.DictWriter(self._file, CSV_FIELDS)
    self._tb = tb.EventWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict) -> None:
    self._csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    self._file.flush()
    scalars = {f"train/{k}": float(row[k]) for k in ("loss", "grad_norm", "lr") if row.get(k) != ""}
    scalars.update({f"perf/{k}": float(row[k]) for k in ("tokens_per_s", "mfu") if row.get(k) not in ("", None)
                    and not math.isnan(float(row[k]))})
    self._tb.scalars(int(row["step"]), scalars)

  def close(self) -> None:
    self._file.close()
    self._tb.close()


def plot_metrics(workdir: str) -> str:
  """workdir/loss.png: training loss (bits/token) against step from metrics.csv, stage starts marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  steps = np.array([int(r["step"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows]) / math.log(2)
  stage = np.array([int(r["stage"]) for r in rows])
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, loss, lw=0.8, alpha=0.5, label="per step")
  if len(loss) >= 20:
    k = max(len(loss) // 50, 5)
    ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
  for i in np.flatnonzero(np.diff(stage)) + 1:
    ax.axvline(steps[i], color="gray", ls="--", lw=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (bits/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, "loss.png")
  fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(path + ".tmp.png", path)
  return path


# ----------------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (then it saves and exits)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, SIGTERM keeps its default
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _stage_at(stages: Sequence[Stage], step: int) -> tuple[int, int]:
  """(stage index, steps already done in it) for a global step count."""
  start = 0
  for s in stages:
    if step < start + s.steps:
      return s.index, step - start
    start += s.steps
  return len(stages), 0


_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rope_theta", "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings")


def _initial_params(config, model_cfg: model_lib.ModelConfig, key: jax.Array):
  """Random parameters, or those of `config.init` (any format lrjax.weights.load reads), whose architecture must
  equal config.model's (every mismatched field is named)."""
  if not config.init:
    return model_lib.init_params(model_cfg, key)
  from lrjax import weights
  try:
    loaded_cfg, params = weights.load(weights.model_path(config.init))
  except (ValueError, OSError) as e:
    raise TrainError(f"config.init {config.init!r}: {str(e).splitlines()[0]}") from e
  diff = [f"{f}={getattr(loaded_cfg, f)!r} (config.model: {getattr(model_cfg, f)!r})" for f in _ARCH_FIELDS
          if getattr(loaded_cfg, f) != getattr(model_cfg, f)]
  if diff:
    raise TrainError(f"config.init {config.init!r} does not match config.model: {'; '.join(diff)}")
  dtype = jnp.dtype(model_cfg.param_dtype)
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def export_hf(directory: str, model_cfg: model_lib.ModelConfig, params, stage: Stage) -> None:
  """Write params as a Hugging Face LlamaForCausalLM directory; a non-default stage rope goes into config.json
  with max_position_embeddings = max(the model's, the stage length)."""
  from lrjax import weights
  scaling = None if stage.rope.method == "default" else stage.rope
  cfg = model_cfg.replace(max_position_embeddings=max(model_cfg.max_position_embeddings, stage.length),
                          original_max_position_embeddings=model_cfg.original_length)
  weights.save_hf(directory, cfg, jax.device_get(params), rope_scaling=scaling, dtype="float32")


def balance_order(model_cfg: model_lib.ModelConfig, mesh) -> str:
  """Causal load balancing for ring attention: zig-zag whenever the ring has more than one device (without
  it the last device does ~2N-1 times the first one's attention work and every step waits for it)."""
  ring = model_cfg.attention.startswith("ring") and mesh.shape.get(sharding_lib.SEQUENCE_AXIS, 1) > 1
  return "zigzag" if ring else "none"


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
  validate_config(config)
  if not workdir:
    raise TrainError("--workdir is required")
  model_cfg = model_config(config)
  stages = parse_stages(config, model_cfg)
  if config.get("export_hf") and stages[-1].rope.method == "longrope" and stages[-1].rope.n_hat:
    raise TrainError(f"export_hf: a Hugging Face config cannot express n_hat={stages[-1].rope.n_hat} of the last "
                     "stage's factors; export with experiments/convert.py --allow_dropping_n_hat instead")
  if config.get("export_hf") and os.path.exists(config.export_hf) and os.listdir(config.export_hf):
    raise TrainError(f"export_hf {config.export_hf!r} exists and is not empty; choose a new directory")
  mesh = sharding_lib.make_mesh(config.mesh)
  for s in stages:
    sharding_lib.validate(mesh, batch=config.batch_size // config.accumulation, length=s.length, config=model_cfg,
                          order=balance_order(model_cfg, mesh))
  docs, marks = load_documents(config.data)
  stream = packing.token_stream(docs, **marks)
  del docs
  os.makedirs(workdir, exist_ok=True)

  key = jax.random.PRNGKey(config.seed)
  optimizers = [make_optimizer(config.optimizer, s) for s in stages]
  abstract = jax.eval_shape(lambda k: init_state(model_cfg, optimizers[0], k), key)
  with sharding_lib.mesh_context(mesh):
    state_sh = state_shardings(mesh, abstract, optimizers[0])
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                     async_save=config.async_checkpoints)
  restored = ckpt.restore_latest(target, report=report)
  if restored is None:
    params = _initial_params(config, model_cfg, key)
    state = jax.jit(lambda p, k: init_state(model_cfg, optimizers[0], k, p), out_shardings=state_sh)(params, key)
    data_state, start = None, 0
    report(f"starting from {'scratch' if not config.init else config.init}: "
           f"{model_cfg.num_params() / 1e6:.2f}M parameters")
  else:
    start, state, data_state = restored
    report(f"resumed from {ckpt.directory}/{start}")
  config_json = json.loads(config.to_json_best_effort())
  log = MetricsLog(workdir, start) if jax.process_index() == 0 else None
  peak = float(config.peak_flops) or (measure_peak_flops() if jax.default_backend() == "cpu" else 0.0)
  total = sum(s.steps for s in stages)
  step = start
  last_saved = start
  losses = []
  preempted = False
  pbar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    pbar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

  try:
    with _Preemption() as preemption, sharding_lib.mesh_context(mesh):
      stage_index, done = _stage_at(stages, start)
      while stage_index < len(stages) and not preemption.requested:
        stage = stages[stage_index]
        optimizer = optimizers[stage_index]
        schedule = learning_rate_schedule(stage)
        if done == 0 and stage_index > 0:  # a new stage: previous params, fresh optimizer and data order
          state = jax.jit(lambda s: s.replace(opt_state=optimizer.init(s.params)), out_shardings=state_sh,
                          donate_argnums=(0,))(state)
          data_state = None
        if data_state is not None and data_state.get("stage", stage_index) != stage_index:
          data_state = None
        packed = packing.PackedBlocks(stream, stage.length)
        it = packing.BatchIterator(packed, config.batch_size, seed=config.seed + 1000 * stage_index,
                                   state=None if data_state is None else
                                   {k: data_state[k] for k in ("epoch", "position")})
        rope = jax.tree.map(jnp.asarray, model_cfg.rope_arrays(stage.rope, seq_len=stage.length))
        step_fn = jit_train_step(make_train_step(model_cfg, optimizer, loss_chunk=config.loss_chunk), mesh,
                                 state_sh)
        report(f"stage {stage_index}: {stage.steps} steps at length {stage.length}, rope {stage.rope_name}"
               f" ({stage.rope.method}), lr {stage.lr:g} {stage.schedule}, from step {done}")
        fpt = flops_per_token(model_cfg, stage.length)
        b_local = config.batch_size // jax.process_count()
        micro = config.accumulation
        pending = None  # (step, metrics) of the previous step: fetched after the next one is dispatched
        t_last = time.perf_counter()

        def finish(pending, elapsed):
          step_no, metrics, stage_step = pending
          m = jax.device_get(metrics)
          if not m["finite"]:
            msg = (f"step {step_no}: non-finite loss {m['loss']} or gradient norm {m['grad_norm']}; "
                   "params and optimizer state left unchanged")
            if config.nan_policy == "stop":
              raise NonFiniteError(msg + "; stopping (nan_policy='stop')")
            report(msg + " (nan_policy='skip')")
          tokens = float(m["tokens"])
          tps = config.batch_size * stage.length / elapsed if elapsed > 0 else float("nan")
          row = {"step": step_no, "stage": stage_index, "loss": float(m["loss"]),
                 "grad_norm": float(m["grad_norm"]), "lr": float(schedule(stage_step)), "tokens": tokens,
                 "tokens_per_s": tps, "mfu": tps * fpt / peak if peak else float("nan"),
                 "skipped": int(not m["finite"]), "wall_time": time.time()}
          losses.append(row["loss"])
          if log is not None:
            log.write(row)
          if pbar is not None:
            pbar.update(1)
            if step_no % config.log_every == 0:
              pbar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tps:.0f}",
                               mfu=f"{row['mfu']:.2f}" if peak else "n/a")

        while done < stage.steps and not preemption.requested:
          host = next(it)
          if balance_order(model_cfg, mesh) != "none":  # once per batch, positions travel with their tokens
            host = ring_lib.load_balance(host, mesh.shape[sharding_lib.SEQUENCE_AXIS], "zigzag")
          host = {k: v.reshape(micro, b_local // micro, *v.shape[1:]) for k, v in host.items()}
          batch = sharding_lib.host_local_to_global(mesh, host, batch_shardings(mesh))
          state, metrics = step_fn(state, batch, rope)
          done += 1
          step += 1
          now = time.perf_counter()
          if pending is not None:
            finish(pending, now - t_last)
            t_last = now
          pending = (step, metrics, done - 1)
          if step % config.checkpoint_every == 0 or done == stage.steps:
            ckpt.save(step, state, {"stage": stage_index, **it.state()}, config_json, force=True)
            last_saved = step
        if pending is not None:
          jax.block_until_ready(state)
          finish(pending, time.perf_counter() - t_last)
        data_state = {"stage": stage_index, **it.state()}
        if done < stage.steps:  # preempted mid-stage
          break
        stage_index, done = stage_index + 1, 0
      if preemption.requested:
        preempted = True
        if step != last_saved:
          ckpt.save(step, state, data_state, config_json, force=True)
        report(f"SIGTERM received: saved checkpoint at step {step}; exiting")
  finally:
    ckpt.close()
    if log is not None:
      log.close()
    if pbar is not None:
      pbar.close()
  if log is not None and losses:
    plot_metrics(workdir)
  if config.get("export_hf") and not preempted and jax.process_index() == 0:
    export_hf(config.export_hf, model_cfg, state.params, stages[-1])
    report(f"exported the final parameters to {config.export_hf} (Hugging Face format)")
  tail = losses[-config.log_every:]
  return {"step": step, "loss": float(np.mean(tail)) if tail else float("nan"),
          "skipped": int(jax.device_get(state.skipped)), "preempted": preempted, "state": state}
