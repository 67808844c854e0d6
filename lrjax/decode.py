"""Greedy decoding with a KV cache: chunked, sequence-parallel prefill and one RoPE factor set per sequence.

Keys in the cache are rotated once, when they are written; a cache built with one factor set and read with
another silently breaks retrieval (the bug several engines shipped for Phi-3's short/long switch). So the
factor set is bound to a sequence, never to a step:

* "total_length" (default): the set is chosen from the final length (prompt + new tokens) before prefill.
* "reprefill" (transformers' behaviour): the set follows the current length; the moment the sequence crosses
  a switch point (e.g. original_max_position_embeddings) the whole sequence is prefilled again with the new
  set (by the same chunked or sharded prefill), so the cache is never mixed.

Prefill: the prompt, left-padded to whole chunks (padding slots hold EMPTY_POSITION and are never seen), goes
through the model `prefill_chunk` tokens at a time into the preallocated cache; each chunk's queries attend over
the cache by position with the blockwise kernel, which skips key blocks wholly in the future. One compiled
program per (chunk, cache length) serves every chunk (cache_index is traced), and its memory is the cache plus
one chunk's activations and one layer's keys: linear in the prompt, no [t, t] array. prefill_chunk=None
prefills the prompt (padded to a multiple of pad_multiple) in one chunk.

Sequence parallel: with `mesh` (a jax.sharding.Mesh whose sequence axis, lrjax.axes.SEQUENCE_AXIS, has R > 1
devices) attention becomes ring attention, the cache's slots are split in R shards over the axis, every chunk is
split over it (shard r holds the r-th R-th of each chunk) and prefilled with ring attention over the cached keys,
and each decoding step attends from the sharded cache by log-sum-exp combination (lrjax.kv_cache); generated
tokens go to the shards in turn. Batch rows follow the mesh's data/fsdp axes, heads its tensor axis.

Shapes: cache k/v [L, b, S, K, H], positions i32[L, b, S] (lrjax.kv_cache).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from lrjax import axes
from lrjax import kv_cache
from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib

EMPTY_POSITION = kv_cache.EMPTY_POSITION
POLICIES = ("total_length", "reprefill")


class DecodeError(ValueError):
  """A decoding argument that cannot work; the message names it."""


class Layout(NamedTuple):
  """Where a sequence sits in the cache: the prompt left-padded to `padded` tokens and prefilled `chunk` tokens
  at a time, into `shards` shards of `per_shard` slots (1 shard without a sequence axis). Shard r holds its piece
  of every chunk (prompt order within the shard), then every generated token n with n % shards == r."""

  padded: int
  chunk: int
  shards: int
  per_shard: int

  @property
  def length(self) -> int:
    """S, the cache's slots."""
    return self.shards * self.per_shard

  def chunk_index(self, i: int) -> int:
    """cache_index of chunk i: each shard's local offset for its piece (lrjax.kv_cache's rule for chunks)."""
    return i * self.chunk // self.shards

  def token_slot(self, n: int) -> int:
    """cache_index (a global slot) of the n-th token fed back after the prompt: round robin over the shards."""
    return (n % self.shards) * self.per_shard + self.padded // self.shards + n // self.shards


def layout(prompt_len: int, new_tokens: int, *, chunk: int | None, pad_multiple: int, shards: int = 1,
           block_k: int = 512) -> Layout:
  """The Layout of a prompt of `prompt_len` tokens followed by up to `new_tokens` fed-back tokens.

  chunk=None: one chunk, the prompt padded to a multiple of pad_multiple (and of shards). Each shard's slots are
  rounded up to whole key blocks (block_k), so the kernel never pads (copies) the cache.
  Raises:
    DecodeError when chunk is not positive or not divisible by the shards.
  """
  if chunk is None:
    padded = -(-prompt_len // math.lcm(pad_multiple, shards)) * math.lcm(pad_multiple, shards)
    chunk = padded
  elif chunk < 1 or chunk % shards:
    raise DecodeError(f"prefill_chunk must be a positive multiple of the sequence axis size {shards}, got {chunk}")
  else:
    padded = -(-prompt_len // chunk) * chunk
  per_shard = padded // shards + -(-new_tokens // shards)
  if per_shard > block_k:
    per_shard = -(-per_shard // block_k) * block_k
  return Layout(padded, chunk, shards, per_shard)


def num_shards(config: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None) -> int:
  """R, the devices of `mesh`'s sequence axis (config.sequence_axis) the cache is split over; 1 without one."""
  if mesh is None or config.sequence_axis not in mesh.axis_names:
    return 1
  return mesh.shape[config.sequence_axis]


def _cache_specs(mesh) -> dict:
  return {name: sharding_lib.logical_to_spec(names, mesh) for name, names in kv_cache.CACHE_AXES.items()}


def init_cache(config: model_lib.ModelConfig, batch: int, length: int, dtype=None,
               mesh: jax.sharding.Mesh | None = None) -> dict:
  """An empty cache of `length` slots (lrjax.kv_cache.init); with `mesh`, created sharded on its devices (slots
  over the sequence axis, rows over data/fsdp, heads over tensor)."""
  make = functools.partial(kv_cache.init, config, batch, length, dtype)
  if mesh is None:
    return make()
  return jax.jit(make, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), _cache_specs(mesh)))()


@functools.lru_cache(maxsize=64)
def compiled_step(config: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """jit of one cache step: fn(params, tokens i32[b, t], positions i32[b, t], rope, cache, cache_index) ->
  (greedy next token i32[b, 1], its logits f32[b, V], cache), the cache donated (updated in place).

  The t tokens are written as lrjax.kv_cache says (a chunk at each shard's local offset, a decoding step at a
  global slot). One compiled program per (t, cache length); cache_index, positions and rope are traced. With
  `mesh`, traced in its context: a chunk is split over the sequence axis, a shorter query is replicated over it.
  fn.lower(*args) lowers the same program (for compiled-memory checks).
  """
  def step(params, tokens, positions, rope, cache, cache_index):
    if mesh is not None:
      cache = jax.lax.with_sharding_constraint(cache, _cache_specs(mesh))
    hidden, cache = model_lib.Llama(config).apply({"params": params}, tokens, positions, rope, cache, cache_index)
    head = model_lib.head_weights(config, params).astype(hidden.dtype)
    logits = jnp.einsum("bd,dv->bv", hidden[:, -1], head, preferred_element_type=jnp.float32)
    if mesh is not None:
      cache = jax.lax.with_sharding_constraint(cache, _cache_specs(mesh))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], logits, cache

  def traced(params, tokens, positions, rope, cache, cache_index):
    if mesh is None:
      return step(params, tokens, positions, rope, cache, cache_index)
    # A query that cannot be split over the sequence axis (a decoding step) keeps its length unsharded.
    split = tokens.shape[1] % num_shards(config, mesh) == 0
    rules = sharding_lib.logical_rules(mesh, None if split else
                                       [(n, None if n == "length" else a) for n, a in axes.LOGICAL_RULES])
    with nn.logical_axis_rules(rules):
      return step(params, tokens, positions, rope, cache, cache_index)

  jitted = jax.jit(traced, donate_argnums=4)
  if mesh is None:
    return jitted

  def run(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  run.lower = lower
  return run


class Prefilled(NamedTuple):
  token: jax.Array  # i32[b, 1], the greedy continuation of the prompt
  logits: jax.Array  # f32[b, V] of the prompt's last token
  cache: dict
  layout: Layout


def execution_config(config: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None) -> model_lib.ModelConfig:
  """`config` as decoding runs it under `mesh`: ring attention when the mesh splits the sequence axis."""
  if num_shards(config, mesh) > 1 and not config.attention.startswith("ring"):
    return config.replace(attention="ring")
  return config


def prefill(config: model_lib.ModelConfig, params: dict, tokens: np.ndarray, rope: rope_lib.RopeArrays, *,
            new_tokens: int = 0, chunk: int | None = None, pad_multiple: int = 256,
            mesh: jax.sharding.Mesh | None = None) -> Prefilled:
  """Prefills prompts i32[b, t] (all rows the same length) chunk by chunk into a new cache with room for
  `new_tokens` more (module doc); `rope` is the sequence's one factor set (device RopeArrays).

  Args: chunk (tokens per compiled step; None: the whole padded prompt), pad_multiple, mesh as greedy_generate.
  Returns: Prefilled(next token, last logits, cache, layout).
  Raises:
    DecodeError for a chunk the mesh's sequence axis cannot split; lrjax.sharding.ShardingError for a batch or
    heads the mesh cannot split.
  """
  config = execution_config(config, mesh)
  tokens = np.asarray(tokens, np.int32)
  b, t = tokens.shape
  lay = layout(t, new_tokens, chunk=chunk, pad_multiple=pad_multiple, shards=num_shards(config, mesh),
               block_k=config.block_k)
  pad = lay.padded - t
  padded = np.concatenate([np.zeros((b, pad), np.int32), tokens], axis=1)
  positions = np.concatenate([np.full((b, pad), EMPTY_POSITION, np.int32),
                              np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))], axis=1)
  if mesh is not None:
    sharding_lib.validate(mesh, batch=b, length=lay.chunk, config=config)
  step = compiled_step(config, mesh)
  cache = init_cache(config, b, lay.length, mesh=mesh)
  for i in range(lay.padded // lay.chunk):
    part = slice(i * lay.chunk, (i + 1) * lay.chunk)
    token, logits, cache = step(params, padded[:, part], positions[:, part], rope, cache,
                                np.int32(lay.chunk_index(i)))
  return Prefilled(token, logits, cache, lay)


def greedy_generate(config: model_lib.ModelConfig, params: dict, prompt: np.ndarray, max_new_tokens: int,
                    *, scaling: rope_lib.RopeScaling | None = None, policy: str = "total_length",
                    pad_multiple: int = 256, prefill_chunk: int | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    stop: Callable[[np.ndarray], bool] | None = None) -> np.ndarray:
  """Greedy continuation of `prompt` i32[b, t] (all rows the same length): returns i32[b, n <= max_new_tokens].

  Args:
    scaling: RoPE setting (default: the checkpoint's own); its factor set is chosen per sequence (policy).
    policy: "total_length" or "reprefill" (see module docstring).
    pad_multiple: a one-chunk prefill pads prompts to a multiple of this, so nearby lengths share one compiled
      program.
    prefill_chunk: prefill this many tokens per step (prompts are padded to whole chunks); None: one chunk.
    mesh: decode sequence-parallel over this mesh's sequence axis (module doc); params may be placed on it.
    stop: optional predicate on the tokens generated so far ([b, n]) to end early.
  Raises:
    DecodeError for an unknown policy, an empty prompt or a chunk the mesh cannot split (as prefill).
  """
  if policy not in POLICIES:
    raise DecodeError(f"unknown decoding policy {policy!r}; expected one of {', '.join(POLICIES)}")
  config = execution_config(config, mesh)
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or not prompt.shape[1]:
    raise DecodeError(f"prompt must be i32[b, t] with t >= 1, got shape {prompt.shape}")
  b, t = prompt.shape
  run_prefill = functools.partial(prefill, config, params, chunk=prefill_chunk, pad_multiple=pad_multiple,
                                  mesh=mesh)
  host_rope = config.rope_arrays(scaling, seq_len=t + max_new_tokens if policy == "total_length" else t)
  rope = _device(host_rope)
  pending, _, cache, lay = run_prefill(prompt, rope, new_tokens=max_new_tokens)
  step, fed = compiled_step(config, mesh), 0
  out = np.zeros((b, max_new_tokens), np.int32)
  for i in range(max_new_tokens):
    n = t + i + 1  # the length once token i is appended; it sits at position n - 1
    token, new_rope = pending, host_rope
    if policy == "reprefill":
      new_rope = config.rope_arrays(scaling, seq_len=n)
    rebuild = not _same_rope(new_rope, host_rope)
    if i + 1 < max_new_tokens and not rebuild:
      # Dispatched before token i is read back, so the device never waits for the host between steps.
      pending, _, cache = step(params, token, np.full((b, 1), n - 1, np.int32), rope, cache,
                               np.int32(lay.token_slot(fed)))
      fed += 1
    out[:, i] = np.asarray(token)[:, 0]
    if i + 1 == max_new_tokens or (stop is not None and stop(out[:, :i + 1])):
      return out[:, :i + 1]
    if rebuild:
      # The factor set changed: rebuild the whole cache with the new set rather than mix two.
      host_rope, rope = new_rope, _device(new_rope)
      sequence = np.concatenate([prompt, out[:, :i + 1]], axis=1)
      pending, _, cache, lay = run_prefill(sequence, rope, new_tokens=max_new_tokens - i - 1)
      fed = 0
  return out


def _device(rope: rope_lib.RopeArrays) -> rope_lib.RopeArrays:
  return jax.tree.map(jnp.asarray, rope)


def _same_rope(a: rope_lib.RopeArrays, b: rope_lib.RopeArrays) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
