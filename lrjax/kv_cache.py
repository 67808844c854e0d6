"""The KV cache of decoding: layout, writes and attention over it, on one device or sharded over a mesh.

Layout (lrjax.model's `cache`): {"k", "v": [L, b, S, K, H], "pos": i32[L, b, S]}, keys stored rotated. A slot
that holds no token has position EMPTY_POSITION, which causal masking by position excludes: what a query sees
is decided by the slots' positions, never their indices, so slots may be filled in any order, and the blockwise
kernel skips key blocks that are wholly empty or in the future.

The model scans its layers with the whole cache in the loop carry: each layer writes its t new slots in place
(a dynamic-update-slice) and its attention reads that layer's slots, so a step holds the cache once plus one
layer's keys and values (the kernel's operands), never a second copy of the cache.

Sequence parallel: with attention "ring[:step]" under a mesh whose sequence axis has R > 1 devices, the slot
axis is split into R contiguous shards of S / R slots (CACHE_AXES), and each call follows its query:
  * t % R == 0 (a prefill chunk, sharded over the axis like any sequence): shard r writes its t / R tokens at
    LOCAL offset cache_index of its own slots, and ring attention (lrjax.ring) rotates the cache shards past
    the local queries.
  * otherwise (a decoding step, t = 1, replicated over the axis): the tokens go to GLOBAL slot cache_index,
    written by the one shard that holds it (they must not straddle two); each shard attends over its own slots
    and the partial results combine by log-sum-exp across the axis (pmax, then psum of weights and weighted
    outputs), so the cache is never gathered.
With R = 1 the two rules agree: the t tokens go to slots [cache_index, cache_index + t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lrjax import attention as attention_lib
from lrjax import axes
from lrjax import ring as ring_lib
from lrjax.kernels.blockwise import Blockwise

EMPTY_POSITION = np.iinfo(np.int32).max
# Logical axes of the cache arrays ("length" is the slot axis: sharded over the sequence axis).
CACHE_AXES = {"k": ("layers", "batch", "length", "kv_heads", "head_dim"),
              "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
              "pos": ("layers", "batch", "length")}


def init(config, batch: int, length: int, dtype=None) -> dict:
  """An empty cache of `length` slots for lrjax.model.ModelConfig `config`: k/v zeros [L, b, S, K, H] in `dtype`
  (default the compute dtype), positions EMPTY_POSITION."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full(shape[:3], EMPTY_POSITION, jnp.int32)}


def shards(config) -> int:
  """R, the shards of the slot axis at trace time: the size of the current mesh's `config.sequence_axis` when
  attention is "ring[:step]", else 1 (a cache on one device, or replicated)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not config.attention.startswith("ring") or mesh.empty or config.sequence_axis not in mesh.axis_names:
    return 1
  return mesh.shape[config.sequence_axis]


def write(cache: dict, layer, k: jax.Array, v: jax.Array, positions: jax.Array, cache_index: jax.Array,
          num_shards: int) -> dict:
  """The cache with layer `layer`'s new keys k, v [b, t, K, H] at positions i32[b, t] written (module doc).

  The slot axis is viewed as [R, S / R] (a free reshape of contiguous shards), so every write is a
  dynamic-update-slice along unsharded dimensions, done in place on each device.
  """
  def put(a, x):
    n_layers, b, s = a.shape[:3]
    rest, t = a.shape[3:], x.shape[1]
    view = a.reshape(n_layers, b, num_shards, s // num_shards, *rest)
    zeros = (0,) * len(rest)
    if t % num_shards == 0:  # sharded like the cache: every shard writes its piece at the local offset
      piece = x.astype(a.dtype).reshape(1, b, num_shards, t // num_shards, *rest)
      return lax.dynamic_update_slice(view, piece, (layer, 0, 0, cache_index, *zeros)).reshape(a.shape)
    owner, offset = cache_index // (s // num_shards), cache_index % (s // num_shards)
    start = (layer, 0, 0, offset, *zeros)
    old = lax.dynamic_slice(view, start, (1, b, num_shards, t, *rest))
    mine = (jnp.arange(num_shards) == owner).reshape((1, 1, num_shards) + (1,) * (1 + len(rest)))
    piece = jnp.where(mine, x.astype(a.dtype)[None, :, None], old)  # only the owner's t slots change
    return lax.dynamic_update_slice(view, piece, start).reshape(a.shape)

  return {"k": put(cache["k"], k), "v": put(cache["v"], v), "pos": put(cache["pos"], positions)}


def attend(q: jax.Array, positions: jax.Array, cache: dict, layer, config, num_shards: int) -> jax.Array:
  """Attention of queries q [b, t, N, H] at positions i32[b, t] over layer `layer`'s slots of the cache.

  One shard: config.attention over the slots (ring means the blockwise kernel; the fast kernels fall back to
  it by themselves for a cache). Sharded: ring attention for a sharded chunk, the log-sum-exp combination of
  per-shard partial attention for a replicated decoding step (module doc). Returns [b, t, N, H] in q.dtype.
  """
  k, v, k_pos = (cache[name][layer] for name in ("k", "v", "pos"))
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  rules = dict(block_q=config.block_q, block_k=config.block_k, sliding_window=config.sliding_window)
  if num_shards == 1:
    impl = "blockwise" if config.attention.startswith("ring") else config.attention
    return attention_lib.attention(q, k, v, positions, k_pos, implementation=impl, **rules)
  if q.shape[1] % num_shards == 0:
    return attention_lib.attention(q, k, v, positions, k_pos, implementation=config.attention,
                                   axis_name=config.sequence_axis, **rules)
  kernel = Blockwise(True, config.sliding_window, config.block_q, config.block_k)
  return partial_attention(q, k, v, positions, k_pos, axis_name=config.sequence_axis, kernel=kernel)


def partial_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                      axis_name: str, kernel) -> jax.Array:
  """Exact attention of replicated queries over keys sharded along their length: no gathering of the keys.

  Each device runs `kernel` (a lrjax.kernels.step.Step) of all queries against its own keys, giving (out, lse);
  with m the maximum lse across the axis, w = exp(lse - m) weighs each device's out, and
  out = psum(w * out) / psum(w). A query that sees no key anywhere gets 0.
  Args: q [b, t, n, h], q_pos i32[b, t] (replicated over axis_name); k, v [b, s, k, h], k_pos i32[b, s] (s split
    over axis_name of the current mesh; batch and heads follow lrjax.ring's batch axes and the tensor axis).
  Returns: [b, t, n, h] in q.dtype.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch = ring_lib.batch_axes(mesh, axis_name) or None
  heads = axes.TENSOR_AXIS if axes.TENSOR_AXIS in mesh.axis_names else None

  def local(q, k, v, q_pos, k_pos):
    out, lse = kernel.forward(q, k, v, q_pos, k_pos, None, None)
    m = lax.pmax(lse, axis_name)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # 0 on a device whose keys this query cannot see
    total = lax.psum(w, axis_name)
    out = lax.psum(out.astype(jnp.float32) * w[..., None], axis_name)
    return (out / jnp.where(total > 0, total, 1.0)[..., None]).astype(q.dtype)

  x_spec, kv_spec = P(batch, None, heads, None), P(batch, axis_name, heads, None)
  # check_vma=False: the kernel starts its loops from unannotated zeros (as in lrjax.ring).
  return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, kv_spec, kv_spec, P(batch, None), P(batch, axis_name)),
                       out_specs=x_spec, check_vma=False)(q, k, v, q_pos, k_pos)
