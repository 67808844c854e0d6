"""Ring attention: exact attention over a sequence sharded across a mesh axis, memory linear in the local length.

Shapes as lrjax.attention: q [b, t, n, h]; k, v [b, s, k, h]; positions i32[b, t] (global positions; causality
compares them, never indices); segment ids i32[b, t] or None. Inside shard_map every device holds one
contiguous slice of the (possibly load-balanced) sequence. Keys, values, their positions and segment ids travel
around the ring with lax.ppermute (device i sends to i+1), so at step j device i holds the block that started
on device i - j.

Each step runs a kernel (lrjax.kernels.step.Step: blockwise, splash or pallas_gpu; lrjax.attention picks it) of
the local queries against the visiting block. Forward: the (out, lse) pairs merge online into an f32
accumulator; the transfer of the block a device holds is issued before that block's compute, so an asynchronous
collective-permute can hide it. Blocks that are wholly masked are skipped by the kernel.

Passes: the ring goes round `passes` times (2 where the kernel takes it), each time with one slice of every
device's keys: the p-th 1/passes of each half of its block, so under zig-zag every slice holds a piece of both
chunks and every step stays balanced. What a device holds beyond its own shards (the visiting keys, the ones
arriving, the backward's accumulator travelling with them) shrinks by that factor; compute and transfer per
step shrink together, so the transfer stays hidden.

Backward (custom VJP): the same passes and steps. Each step runs the kernel's backward with the GLOBAL (out,
lse), so its gradients are exact shares of the full softmax, added in place to f32 accumulators: dq stays on
its device; a slice's dk/dv accumulator travels with its keys (a step adds to it, then sends it on), so it is
home after the pass's n steps and is written into dk, dv.

Per device, beyond its q, k, v, dout shards, (out, lse) and the dq, dk, dv results: two key slices (held and
arriving: 2/passes of its K/V), one travelling dk/dv accumulator (1/passes; twice that while it is sent, after
the compute) and the kernel's tiles. benchmarks/ring_memory.py (compiled, fwd+bwd, 64k tokens, 4 heads (2 kv)
x 64, f32, block 512): 1/2/4/8 devices = 391/219/114/62 MiB per device, 8 devices = 0.158 of one (target 1.3/8).

Load balancing for causal attention (applied ONCE to the data: tokens, targets, positions, weights, segments):
  zigzag  (dual chunk swap) 2N chunks, device i gets chunks i and 2N-1-i; with block sizes dividing the
          chunk length, half of each off-diagonal step is skipped and every device does the same work.
  striped token j goes to device j mod N; balanced, but no block can be skipped.
RoPE (including LongRoPE's n̂ and short/long factor switch) is computed from the permuted positions array,
so it is unaffected.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lrjax import axes
from lrjax.kernels import blockwise
from lrjax.kernels import mask
from lrjax.kernels import step as step_lib
from lrjax.kernels.step import Step


class RingError(ValueError):
  """A ring-attention input or mesh that cannot work; the message names the problem."""


# ----------------------------------------------------------------------------------------------------------
# Load balancing (host or device; any leading batch dim, sequence on axis 1).


def permutation(length: int, n: int, order: str) -> np.ndarray:
  """Index array idx (int[length]) such that x[:, idx] is the load-balanced order for a ring of n devices.

  After the permutation, device i's contiguous slice [i*length/n, (i+1)*length/n) holds its tokens.
  """
  if order not in axes.LOAD_BALANCE_ORDERS:
    raise RingError(f"unknown load-balancing order {order!r}; expected one of {axes.LOAD_BALANCE_ORDERS}")
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


# ----------------------------------------------------------------------------------------------------------
# The ring (call inside shard_map).


def _rotate(tree, axis_name, n):
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), tree)


class _Block(NamedTuple):
  """What travels around the ring: one device's keys, values, their positions and segment ids."""
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  seg: jax.Array | None


def _zero_after(x):
  """f32 0.0 computed from x's first element (exactly 0 for any value, inf and NaN included).

  Why: arrays built from it are made only once x exists and are nobody else's. A broadcast of the constant 0
  is shared (CSE) with every zero array of its shape in the program (the kernels' initial values), and XLA may
  schedule it, and the copies that its in-place users need, at the start: then the backward's accumulators
  and its copies of K/V sit in memory through the whole forward. (jax.lax.optimization_barrier does not
  help: the CPU compiler removes it before scheduling.)"""
  s = x.reshape(-1)[0].astype(jnp.float32)
  return jnp.where(jnp.isfinite(s), jnp.abs(s) * 0, 0)


def _key_slice(blk: _Block, p, passes: int) -> _Block:
  """Slice p of `passes` of the local keys: the p-th 1/passes of each half of the block ([b, s/passes, ...]).

  A piece of each half, not one contiguous piece, keeps the ring balanced under zig-zag: every slice holds a
  piece of both of the device's chunks, so each step of each pass does the same work on every device.
  """
  if passes == 1:
    return blk

  def one(a):
    b, s = a.shape[:2]
    a = a.reshape(b, 2, passes, s // (2 * passes), *a.shape[2:])
    return lax.dynamic_index_in_dim(a, p, axis=2, keepdims=False).reshape(b, s // passes, *a.shape[4:])
  return jax.tree.map(one, blk)


def _slices_home(x, zero, passes: int):
  """Zeros in x's dtype laid out for _put_slice: [b, 2, passes, s/2/passes, ...] ([b, s, ...] for one pass)."""
  b, s = x.shape[:2]
  shape = x.shape if passes == 1 else (b, 2, passes, s // 2 // passes, *x.shape[2:])
  return jnp.broadcast_to(zero.astype(x.dtype), shape)


def _put_slice(home, piece, p, passes: int):
  """`home` (_slices_home) with slice p (as _key_slice cuts it) of a [b, s, ...] array written in, in its dtype."""
  piece = piece.astype(home.dtype)
  if passes == 1:
    return piece
  b, c = piece.shape[0], piece.shape[1] // 2
  return lax.dynamic_update_index_in_dim(home, piece.reshape(b, 2, c, *piece.shape[2:]), p, 2)


def _ring_forward(kernel: Step, q, q_pos, q_seg, blk: _Block, axis_name, passes: int):
  """`passes` rings of n steps, each over one key slice of every device (_key_slice); every step issues the
  transfer of the slice it holds before its compute, and the f32 (out, lse) accumulator starts empty (lse -inf,
  out 0). So the kernel has one call site in the program: a second one (a peeled first or last step) would
  share its zero initial values with the first (XLA's CSE) and keep a copy of them alive throughout. The price
  is one unused transfer per pass (the n-th, which brings the slice home)."""
  n = lax.axis_size(axis_name)
  if n == 1:
    return kernel.forward(q, blk.k, blk.v, q_pos, blk.pos, q_seg, blk.seg)
  zero = _zero_after(q)

  def step(carry, _):
    acc, blk = carry
    nxt = _rotate(blk, axis_name, n)  # issued before the compute it does not depend on
    new = kernel.forward(q, blk.k, blk.v, q_pos, blk.pos, q_seg, blk.seg)
    return (step_lib.merge(acc, new), nxt), None

  def ring_pass(acc, p):
    return lax.scan(step, (acc, _key_slice(blk, p, passes)), length=n)[0][0], None

  acc = (jnp.broadcast_to(zero, q.shape), jnp.broadcast_to(zero - jnp.inf, q.shape[:3]))
  o, lse = lax.scan(ring_pass, acc, jnp.arange(passes))[0]
  return o.astype(q.dtype), lse


def _ring_backward(kernel: Step, q, q_pos, q_seg, blk: _Block, out, lse, dout, axis_name, passes: int):
  """The forward's passes and steps again. dq accumulates in place on its device; each key slice's f32 dk/dv
  accumulator travels with it (a step adds its share, then sends it on with the keys), so after the n steps of
  a pass it is home and is written into dk, dv (in k's dtype)."""
  n = lax.axis_size(axis_name)
  if n == 1:
    return kernel.backward(q, blk.k, blk.v, q_pos, blk.pos, q_seg, blk.seg, out, lse, dout, None, None, None)
  zero = _zero_after(lse)  # from the forward's output: the accumulators are made after the forward

  def step(carry, _):
    dq, blk, dkv = carry
    nxt = _rotate(blk, axis_name, n)
    dq, *dkv = kernel.backward(q, blk.k, blk.v, q_pos, blk.pos, q_seg, blk.seg, out, lse, dout, dq, *dkv)
    return (dq, nxt, _rotate(tuple(dkv), axis_name, n)), None

  def ring_pass(carry, p):
    dq, dk, dv = carry
    piece = _key_slice(blk, p, passes)
    dkv = tuple(jnp.broadcast_to(zero, x.shape) for x in (piece.k, piece.v))
    dq, _, (dk_p, dv_p) = lax.scan(step, (dq, piece, dkv), length=n)[0]
    return (dq, _put_slice(dk, dk_p, p, passes), _put_slice(dv, dv_p, p, passes)), None

  init = (jnp.broadcast_to(zero, q.shape), _slices_home(blk.k, zero, passes), _slices_home(blk.v, zero, passes))
  dq, dk, dv = lax.scan(ring_pass, init, jnp.arange(passes))[0]
  return dq, dk.reshape(blk.k.shape), dv.reshape(blk.v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring_attention(kernel, axis_name, passes, q, k, v, q_pos, k_pos, q_seg, k_seg):
  return _ring_forward(kernel, q, q_pos, q_seg, _Block(k, v, k_pos, k_seg), axis_name, passes)[0]


def _ring_attention_fwd(kernel, axis_name, passes, q, k, v, q_pos, k_pos, q_seg, k_seg):
  out, lse = _ring_forward(kernel, q, q_pos, q_seg, _Block(k, v, k_pos, k_seg), axis_name, passes)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _ring_attention_bwd(kernel, axis_name, passes, res, dout):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = res
  dq, dk, dv = _ring_backward(kernel, q, q_pos, q_seg, _Block(k, v, k_pos, k_seg), out, lse, dout, axis_name,
                              passes)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _kernel(kernel, causal, sliding_window, block_q, block_k, scale) -> Step:
  return blockwise.Blockwise(causal, sliding_window, block_q, block_k, scale) if kernel is None else kernel


def _passes(kernel: Step, q, k, passes: int | None) -> int:
  """The number of key passes for local shapes q [b, t, n, h], k [b, s, k, h] (see ring_attention).

  Raises:
    RingError when an explicit `passes` does not split the local keys or the kernel cannot take the slices.
  """
  def why_not(p):
    s = k.shape[1]
    if p == 1:
      return None
    if p < 1 or s % (2 * p):
      return f"the local key length {s} does not split into 2 x {p} equal pieces"
    return step_lib.unsupported(kernel, q, jax.ShapeDtypeStruct((k.shape[0], s // p, *k.shape[2:]), k.dtype))

  if passes is None:
    return 2 if why_not(2) is None else 1
  reason = why_not(passes)
  if reason:
    raise RingError(f"ring attention: passes={passes}: {reason}")
  return passes


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                   axis_name: str, causal: bool = True, block_q: int = 512, block_k: int = 512,
                   scale: float | None = None, q_segment: jax.Array | None = None,
                   k_segment: jax.Array | None = None, sliding_window: int | None = None,
                   kernel: Step | None = None, passes: int | None = None) -> jax.Array:
  """Exact attention over a ring; call INSIDE shard_map (with check_vma=False) on local shards.

  Args:
    q: [b, t, n, h] local queries; k, v: [b, s, k, h] local keys/values (n divisible by k: GQA without
      repeating keys).
    q_pos, k_pos: i32[b, t], i32[b, s] global positions of the local tokens.
    axis_name: the mesh axis the sequence is sharded over (the ring).
    causal, sliding_window, q_segment, k_segment: the mask (lrjax.kernels.mask); segment ids travel with
      their keys.
    block_q, block_k: blockwise tiles (tokens); for zig-zag, divisors of t/2 let masked halves be skipped.
    scale: logit scale (default h ** -0.5).
    kernel: the per-step kernel (a lrjax.kernels.step.Step, with its own mask settings); None: the blockwise
      kernel built from the arguments above.
    passes: the ring runs this many passes, each over 1/passes of every device's keys and values (the p-th
      slice of each half of the local keys, so zig-zag stays balanced): the blocks held and in flight, and their
      gradient accumulators, shrink by that factor; each step's compute and transfer shrink together, so the
      transfer hides behind the compute as before, with `passes` times as many steps. None: 2 where the local
      keys split and the kernel takes the slices (lrjax.kernels.step.unsupported), else 1.
  Returns:
    [b, t, n, h] in q.dtype; differentiable in q, k, v (positions and segment ids get no gradient).
  Raises:
    RingError when an explicit `passes` cannot split these keys for this kernel.
  """
  mask.check(q_pos, k_pos, q_segment, k_segment, causal=causal, sliding_window=sliding_window)
  kernel = _kernel(kernel, causal, sliding_window, block_q, block_k, scale)
  return _ring_attention(kernel, axis_name, _passes(kernel, q, k, passes), q, k, v, q_pos, k_pos, q_segment,
                         k_segment)


def batch_axes(mesh, axis_name: str) -> tuple[str, ...]:
  """The mesh axes a sequence's batch dim is split over: what the active logical rules give "batch" (a search
  that puts candidates on the data axis maps batch to fsdp only), else BATCH_AXES; never the ring's own axis."""
  rules = dict(nn.get_logical_axis_rules() or ())
  chosen = rules.get("batch", axes.BATCH_AXES)
  chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen or ())
  return tuple(a for a in chosen if a in mesh.axis_names and a != axis_name)


def _problems(mesh, axis_name, q, k, v, q_pos, k_pos, q_segment, k_segment):
  """Human-readable reasons why these global shapes cannot be sharded over the ring (empty: they can)."""
  names = tuple(mesh.axis_names)
  if axis_name not in names:
    return [f"ring axis {axis_name!r} is not in the mesh axes {names}"]
  batch = batch_axes(mesh, axis_name)
  head_axis = axes.TENSOR_AXIS if axes.TENSOR_AXIS in names else None
  b, t, n_heads, _ = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  ring, n_batch, n_tp = mesh.shape[axis_name], mesh_size(mesh, batch), mesh_size(mesh, head_axis)
  problems = []
  if k.shape != v.shape or k.shape[0] != b:
    problems.append(f"k {k.shape} and v {v.shape} must match each other and q's batch {b}")
  if q_pos.shape != (b, t) or k_pos.shape != (b, s):
    problems.append(f"positions must be [b, t] = {(b, t)} and [b, s] = {(b, s)}, got {q_pos.shape}, "
                    f"{k_pos.shape}")
  if q_segment is not None and (q_segment.shape != (b, t) or k_segment.shape != (b, s)):
    problems.append(f"segment ids must be [b, t] = {(b, t)} and [b, s] = {(b, s)}, got {q_segment.shape}, "
                    f"{k_segment.shape}")
  if t % ring or s % ring:
    problems.append(f"lengths (q {t}, k {s}) are not divisible by ring axis {axis_name!r} of size {ring}")
  if b % n_batch:
    problems.append(f"batch {b} is not divisible by {batch} of size {n_batch}")
  if n_heads % n_tp or kv_heads % n_tp:
    problems.append(f"heads (q {n_heads}, kv {kv_heads}) are not divisible by {head_axis!r} of size {n_tp}")
  if n_heads % kv_heads:
    problems.append(f"query heads {n_heads} are not a multiple of key/value heads {kv_heads}")
  return problems


def mesh_size(mesh, spec_entry) -> int:
  """How many devices a PartitionSpec entry (None, an axis name or a tuple of them) splits a dim over."""
  names = () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else spec_entry
  return math.prod(mesh.shape[a] for a in names)


def context_mesh(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None):
  """`mesh`, or the current one (jax.set_mesh / lrjax.sharding.mesh_context); raises RingError if none."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise RingError("ring attention needs a mesh: trace the model under jax.set_mesh(mesh) "
                      "(lrjax.sharding.mesh_context) or pass mesh=")
  return mesh


def ring_attention_sharded(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                           axis_name: str = axes.SEQUENCE_AXIS, causal: bool = True,
                           block_q: int = 512, block_k: int = 512, scale: float | None = None,
                           mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                           q_segment: jax.Array | None = None, k_segment: jax.Array | None = None,
                           sliding_window: int | None = None, kernel: Step | None = None,
                           passes: int | None = None) -> jax.Array:
  """Ring attention on global arrays: shard_map over the current mesh (jax.set_mesh / sharding.mesh_context).

  Specs: q, k, v P((data, fsdp), axis_name, tensor, None); positions and segment ids P((data, fsdp), axis_name).
  Args and returns as ring_attention, with global shapes; `mesh` overrides the context mesh.
  Raises:
    RingError when there is no mesh, the axis is missing, or the shapes do not divide over it.
  """
  mesh = context_mesh(mesh)
  problems = _problems(mesh, axis_name, q, k, v, q_pos, k_pos, q_segment, k_segment)
  if problems:
    raise RingError("ring attention: " + "; ".join(problems))
  names = tuple(mesh.axis_names)
  batch = batch_axes(mesh, axis_name) or None
  x_spec = P(batch, axis_name, axes.TENSOR_AXIS if axes.TENSOR_AXIS in names else None, None)
  pos_spec = P(batch, axis_name)
  seg_spec = None if q_segment is None else pos_spec
  mask.check(q_pos, k_pos, q_segment, k_segment, causal=causal, sliding_window=sliding_window)
  kernel = _kernel(kernel, causal, sliding_window, block_q, block_k, scale)
  local = lambda x: jax.ShapeDtypeStruct(tuple(d // mesh_size(mesh, a) for d, a in zip(x.shape, x_spec)), x.dtype)
  fn = functools.partial(_ring_attention, kernel, axis_name, _passes(kernel, local(q), local(k), passes))
  # check_vma=False: the kernels start their scans/conds from unannotated zeros, which the varying-manual-axes
  # type check rejects; every output here is varying along all mapped axes anyway.
  return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, pos_spec, pos_spec, seg_spec, seg_spec),
                       out_specs=x_spec, check_vma=False)(q, k, v, q_pos, k_pos, q_segment, k_segment)
