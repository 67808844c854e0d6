"""Ring attention: exact attention over a sequence sharded across a mesh axis, memory linear in the local length.

Shapes as lrjax.attention: q [b, t, n, h]; k, v [b, s, k, h]; positions i32[b, t] (global positions; causality
compares them, never indices). Inside shard_map every device holds one contiguous slice of the (possibly
load-balanced) sequence. Keys/values and their positions travel around the ring with lax.ppermute (device i
sends to i+1), so at step j device i holds the block that started on device i - j.

Forward: each step runs attention.flash_forward of the local queries against the visiting block and merges
the (out, lse) pairs online. The transfer of the next block is issued before the current block's compute, so
an asynchronous collective-permute can hide it. Blocks that are wholly masked are skipped by the kernel.

Backward (custom VJP): a second ring. Each step runs attention.flash_backward with the GLOBAL (out, lse), so
its block gradients are exact shares of the full softmax. dq accumulates locally; dk/dv accumulators (f32)
travel with their blocks, one step behind (they depend on that step's compute), and a last transfer brings
them home.

Load balancing for causal attention (applied ONCE to the data: tokens, targets, positions, weights):
  zigzag  (dual chunk swap) 2N chunks, device i gets chunks i and 2N-1-i; with block sizes dividing the
          chunk length, half of each off-diagonal step is skipped and every device does the same work.
  striped token j goes to device j mod N; balanced, but no block can be skipped.
RoPE (including LongRoPE's n̂ and short/long factor switch) is computed from the permuted positions array,
so it is unaffected.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lrjax import attention as attention_lib
from lrjax import axes

ORDERS = axes.LOAD_BALANCE_ORDERS


class RingError(ValueError):
  """A ring-attention input or mesh that cannot work; the message names the problem."""


# ----------------------------------------------------------------------------------------------------------
# Load balancing (host or device; any leading batch dim, sequence on axis 1).


def permutation(length: int, n: int, order: str) -> np.ndarray:
  """Index array idx (int[length]) such that x[:, idx] is the load-balanced order for a ring of n devices.

  After the permutation, device i's contiguous slice [i*length/n, (i+1)*length/n) holds its tokens.
  """
  if order not in ORDERS:
    raise RingError(f"unknown load-balancing order {order!r}; expected one of {ORDERS}")
  if n < 1:
    raise RingError(f"ring size must be positive, got {n}")
  idx = np.arange(length)
  if order == "none" or n == 1:
    return idx
  if order == "zigzag":
    if length % (2 * n):
      raise RingError(f"zig-zag load balancing needs length divisible by 2*ring = {2 * n}, got {length}")
    chunks = idx.reshape(2 * n, length // (2 * n))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])
  if length % n:
    raise RingError(f"striped load balancing needs length divisible by the ring size {n}, got {length}")
  return idx.reshape(length // n, n).T.reshape(-1)


def load_balance(x: Any, n: int, order: str) -> Any:
  """Reorder every [b, t, ...] leaf of a pytree along axis 1 (numpy stays numpy, jax stays jax)."""
  def one(a):
    idx = permutation(a.shape[1], n, order)
    return a[:, idx]
  return jax.tree.map(one, x)


def inverse(x: Any, n: int, order: str) -> Any:
  """Undo load_balance: back to the original sequence order."""
  def one(a):
    idx = np.argsort(permutation(a.shape[1], n, order))
    return a[:, idx]
  return jax.tree.map(one, x)


# ----------------------------------------------------------------------------------------------------------
# The ring (call inside shard_map).


def _rotate(tree, axis_name, n):
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), tree)


def _merge(acc, new):
  """Online-softmax merge of two partial attentions (o f32[b,t,n,h], lse f32[b,t,n]) over disjoint keys."""
  o_a, lse_a = acc
  o_b, lse_b = new
  lse = jnp.logaddexp(lse_a, lse_b)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that have seen no key yet: both weights 0
  w_a = jnp.exp(lse_a - lse_safe)[..., None]
  w_b = jnp.exp(lse_b - lse_safe)[..., None]
  return o_a * w_a + o_b.astype(jnp.float32) * w_b, lse


def _ring_forward(q, k, v, q_pos, k_pos, axis_name, causal, block_q, block_k, scale):
  n = lax.axis_size(axis_name)
  kw = dict(causal=causal, block_q=block_q, block_k=block_k, scale=scale)

  def attend(blk):
    kb, vb, kpb = blk
    o, lse = attention_lib.flash_forward(q, kb, vb, q_pos, kpb, **kw)
    return o.astype(jnp.float32), lse

  blk = (k, v, k_pos)
  nxt = _rotate(blk, axis_name, n) if n > 1 else blk  # issued before the compute it does not depend on
  acc = attend(blk)
  if n > 1:
    def body(carry, _):
      acc, blk = carry
      nxt = _rotate(blk, axis_name, n)
      return (_merge(acc, attend(blk)), nxt), None

    (acc, last), _ = lax.scan(body, (acc, nxt), length=n - 2)
    acc = _merge(acc, attend(last))
  o, lse = acc
  return o.astype(q.dtype), lse


def _ring_backward(q, k, v, q_pos, k_pos, out, lse, dout, axis_name, causal, block_q, block_k, scale):
  n = lax.axis_size(axis_name)
  kw = dict(causal=causal, block_q=block_q, block_k=block_k, scale=scale)

  def grads(blk):
    kb, vb, kpb = blk
    return attention_lib.flash_backward(q, kb, vb, q_pos, kpb, out, lse, dout, **kw)

  blk = (k, v, k_pos)
  if n == 1:
    return grads(blk)
  nxt = _rotate(blk, axis_name, n)
  dq, dk, dv = grads(blk)
  pending = (dk, dv)  # accumulators of the block just used, sent at the start of the next step

  def step(dq, blk, pending):
    acc = _rotate(pending, axis_name, n)  # arrives with (is the accumulator of) the block now held
    dq_c, dk_c, dv_c = grads(blk)
    return dq + dq_c, (acc[0] + dk_c, acc[1] + dv_c)

  def body(carry, _):
    dq, blk, pending = carry
    nxt = _rotate(blk, axis_name, n)
    dq, pending = step(dq, blk, pending)
    return (dq, nxt, pending), None

  (dq, last, pending), _ = lax.scan(body, (dq, nxt, pending), length=n - 2)
  dq, pending = step(dq, last, pending)  # the last block needs no onward K/V transfer
  dk, dv = _rotate(pending, axis_name, n)  # home
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring_attention(q, k, v, q_pos, k_pos, axis_name, causal, block_q, block_k, scale):
  return _ring_forward(q, k, v, q_pos, k_pos, axis_name, causal, block_q, block_k, scale)[0]


def _ring_attention_fwd(q, k, v, q_pos, k_pos, axis_name, causal, block_q, block_k, scale):
  out, lse = _ring_forward(q, k, v, q_pos, k_pos, axis_name, causal, block_q, block_k, scale)
  return out, (q, k, v, q_pos, k_pos, out, lse)


def _ring_attention_bwd(axis_name, causal, block_q, block_k, scale, res, dout):
  q, k, v, q_pos, k_pos, out, lse = res
  dq, dk, dv = _ring_backward(q, k, v, q_pos, k_pos, out, lse, dout, axis_name, causal, block_q, block_k,
                              scale)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                   axis_name: str, causal: bool = True, block_q: int = 512, block_k: int = 512,
                   scale: float | None = None) -> jax.Array:
  """Exact attention over a ring; call INSIDE shard_map (with check_vma=False) on local shards.

  Args:
    q: [b, t, n, h] local queries; k, v: [b, s, k, h] local keys/values (n divisible by k: GQA without
      repeating keys).
    q_pos, k_pos: i32[b, t], i32[b, s] global positions of the local tokens.
    axis_name: the mesh axis the sequence is sharded over (the ring).
    causal: mask key positions > query position.
    block_q, block_k: flash block sizes (tokens); for zig-zag, divisors of t/2 let masked halves be skipped.
    scale: logit scale (default h ** -0.5).
  Returns:
    [b, t, n, h] in q.dtype; differentiable in q, k, v (positions get no gradient).
  """
  return _ring_attention(q, k, v, q_pos, k_pos, axis_name, causal, block_q, block_k, scale)


def ring_attention_sharded(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                           axis_name: str = axes.SEQUENCE_AXIS, causal: bool = True,
                           block_q: int = 512, block_k: int = 512, scale: float | None = None,
                           mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> jax.Array:
  """Ring attention on global arrays: shard_map over the current mesh (jax.set_mesh / sharding.mesh_context).

  Specs: q, k, v P((data, fsdp), axis_name, tensor, None); positions P((data, fsdp), axis_name).
  Args and returns as ring_attention, with global shapes; `mesh` overrides the context mesh.
  Raises:
    RingError when there is no mesh, the axis is missing, or the shapes do not divide over it.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise RingError("ring attention needs a mesh: trace the model under jax.set_mesh(mesh) "
                      "(lrjax.sharding.mesh_context) or pass mesh=")
  names = tuple(mesh.axis_names)
  if axis_name not in names:
    raise RingError(f"ring axis {axis_name!r} is not in the mesh axes {names}")
  batch_axes = tuple(a for a in axes.BATCH_AXES if a in names and a != axis_name)
  head_axis = axes.TENSOR_AXIS if axes.TENSOR_AXIS in names else None
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  b, t, n_heads, _ = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  ring, n_batch, n_tp = mesh.shape[axis_name], size(batch_axes), size((head_axis,) if head_axis else ())
  problems = []
  if k.shape != v.shape or k.shape[0] != b:
    problems.append(f"k {k.shape} and v {v.shape} must match each other and q's batch {b}")
  if q_pos.shape != (b, t) or k_pos.shape != (b, s):
    problems.append(f"positions must be [b, t] = {(b, t)} and [b, s] = {(b, s)}, got {q_pos.shape}, "
                    f"{k_pos.shape}")
  if t % ring or s % ring:
    problems.append(f"lengths (q {t}, k {s}) are not divisible by ring axis {axis_name!r} of size {ring}")
  if b % n_batch:
    problems.append(f"batch {b} is not divisible by {batch_axes} of size {n_batch}")
  if n_heads % n_tp or kv_heads % n_tp:
    problems.append(f"heads (q {n_heads}, kv {kv_heads}) are not divisible by {head_axis!r} of size {n_tp}")
  if n_heads % kv_heads:
    problems.append(f"query heads {n_heads} are not a multiple of key/value heads {kv_heads}")
  if problems:
    raise RingError("ring attention: " + "; ".join(problems))
  batch = batch_axes or None
  x_spec = P(batch, axis_name, head_axis, None)
  pos_spec = P(batch, axis_name)
  fn = functools.partial(ring_attention, axis_name=axis_name, causal=causal, block_q=block_q,
                         block_k=block_k, scale=scale)
  # check_vma=False: attention.flash_* start their scans/conds from unannotated zeros, which the
  # varying-manual-axes type check rejects; every output here is varying along all mapped axes anyway.
  return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, pos_spec, pos_spec),
                       out_specs=x_spec, check_vma=False)(q, k, v, q_pos, k_pos)
