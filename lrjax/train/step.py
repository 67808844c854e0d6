"""The train step: one jitted, sharded, donated update, and what it needs (state, shardings, FLOPs).

The step: forward to final hidden states, `lrjax.loss.chunked_nll` (no [b, t, V] logits), gradients of
sum(NLL) / sum(weights) over all microbatches (gradient accumulation is an inner lax.scan, so the accumulated
gradient is exactly the full-batch gradient), the stage's optimizer, and a NaN/inf guard that leaves params and
optimizer state unchanged when the loss or gradient norm is not finite. Positions, segment ids and the RoPE
arrays are inputs: a factor set or a stage's length never changes the compiled step's code, only its shapes.

Model FLOPs (for MFU), per trained token: 6 * N + 6 * L * t * (n * h), where N counts the matmul parameters
(every weight except the embedding table and the norms; a tied head counts once), L layers, t the sequence
length, n query heads, h head dim. 6 * L * t * n * h is the attention score and value matmuls (12 * L * t * n * h
for forward + backward) halved for causality.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lrjax import loss as loss_lib
from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib

# Batch arrays the step reads ([A, b, t] each); "segment_ids" and "original_rope" only when the data has them.
BATCH_KEYS = ("inputs", "targets", "positions", "weights")


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


def loss_sums(model_cfg: model_lib.ModelConfig, params, batch: dict, rope: rope_lib.RopeArrays,
              loss_chunk: int) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted NLL in nats, sum of weights) of one batch {inputs, targets, positions, weights[,
  segment_ids, original_rope]} [b, t]."""
  hidden = model_lib.forward(model_cfg, params, batch["inputs"], batch["positions"], rope,
                             segment_ids=batch.get("segment_ids"), original=batch.get("original_rope"))
  nll, count = loss_lib.chunked_nll(hidden, model_lib.head_weights(model_cfg, params), batch["targets"],
                                    batch["weights"], chunk=loss_chunk)
  return jnp.sum(nll), jnp.sum(count)


def make_train_step(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation, *,
                    loss_chunk: int = 2048, schedule: optax.Schedule | None = None) -> Callable:
  """The pure train step `step(state, batch, rope) -> (state, metrics)` (jit it with `jit_train_step`).

  batch: [A, b, t] arrays (A microbatches whose gradients are summed before one update). metrics: {loss
  (nats/token), grad_norm, tokens, finite, lr (the schedule at this update, when given)}.
  """

  def grad_sums(params, micro, rope):
    (nll, count), grads = jax.value_and_grad(lambda p: loss_sums(model_cfg, p, micro, rope, loss_chunk),
                                             has_aux=True)(params)
    return nll, count, grads

  def step(state: TrainState, batch: dict, rope: rope_lib.RopeArrays):
    params = state.params
    if batch["inputs"].shape[0] == 1:
      nll, count, grads = grad_sums(params, jax.tree.map(lambda x: x[0], batch), rope)
    else:
      def body(carry, micro):
        return jax.tree.map(jnp.add, carry, grad_sums(params, micro, rope)), None
      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
      (nll, count, grads), _ = jax.lax.scan(body, zeros, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    loss, grad_norm = nll / denom, optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    rng, _ = jax.random.split(state.rng)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    if schedule is not None:  # the lr this update used, computed here rather than by a host-side dispatch
      metrics["lr"] = schedule(_schedule_count(state.opt_state))
    new_state = TrainState(params=keep(optax.apply_updates(params, updates), params),
                           opt_state=keep(opt_state, state.opt_state), step=state.step + 1, rng=rng,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    return new_state, metrics

  return step


def _schedule_count(opt_state) -> jax.Array:
  """The update count the learning-rate schedule reads (optax's ScaleByScheduleState)."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return next(x.count for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x))


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


def batch_sharding(mesh) -> NamedSharding:
  """Sharding of [A, b, t] batch arrays: microbatch axis replicated, then lrjax.sharding's batch spec."""
  return NamedSharding(mesh, P(None, *sharding_lib.batch_spec(mesh)))


def jit_train_step(step: Callable, mesh, state_sh: TrainState) -> Callable:
  """jax.jit with explicit shardings and the state donated (updated in place)."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh), replicated),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))


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
