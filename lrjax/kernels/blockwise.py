"""Blockwise (FlashAttention-2 style) attention in pure JAX: O(t) memory forward and backward, any backend.

One layout and one block classifier serve the forward and the backward. Operands stay in their natural layout
(q [b, t, n, h], k, v [b, s, k, h]); each block step slices its tiles and lays them out as P = b * k tiles of
[g*bq, h] (the g query heads that share a key/value head are extra rows) against [bk, h], so no full-size
relayout or scaled copy of q is ever made (the relayouts are block-sized, O(bq h) per O(bq bk h) step).
Each block pair is classified once (lrjax.kernels.mask.block_class): EMPTY pairs are skipped, FULL ones skip
building the mask, PARTIAL ones apply it.

The tile math is written for one (batch row, key/value head) tile and applied over P per backend: vmapped into
P-batched matmuls (accelerators want one large batched matmul per step), or one tile at a time on the CPU
(`head_loop`, forward and backward), where a step over all P spills the cache; measured on 2 CPU cores, the
backward is about 10% faster that way.

The backward adds into given f32 accumulators (dq, dk, dv), updated in place block by block, so ring attention
keeps exactly one set per device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lrjax.kernels import mask as mask_lib
from lrjax.kernels import reference
from lrjax.kernels import step as step_lib


class _Layout(NamedTuple):
  b: int
  t: int
  s: int
  n: int
  kv: int
  g: int
  h: int
  bq: int
  bk: int
  nq: int
  nk: int


def _layout(q, k, block_q: int, block_k: int) -> _Layout:
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  reference.split_heads(q, kv)  # validates the head ratio
  bq, bk = min(block_q, t), min(block_k, s)
  return _Layout(b, t, s, n, kv, n // kv, h, bq, bk, -(-t // bq), -(-s // bk))


def default_head_loop(head_loop: bool | None) -> bool:
  """The per-backend choice: one (batch row, key/value head) at a time on the CPU, batched elsewhere."""
  return jax.default_backend() == "cpu" if head_loop is None else head_loop


def _pad(x, size: int, axis: int = 1, mode: str = "constant"):
  """x padded along `axis` to `size` (a copy only when it is short: lengths that are not whole blocks)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, mode=mode) if size > x.shape[axis] else x


def _q_tile(x, i, lay: _Layout):
  """Query block i of a per-query array [b, T, n, ...] as [P, g*bq, ...] (rows: head-major, then position)."""
  x = lax.dynamic_slice_in_dim(x, i * lay.bq, lay.bq, axis=1)
  x = x.reshape(lay.b, lay.bq, lay.kv, lay.g, *x.shape[3:])
  x = jnp.moveaxis(x, 1, 3)  # [b, k, g, bq, ...]
  return x.reshape(lay.b * lay.kv, lay.g * lay.bq, *x.shape[4:])


def _q_untile(x, lay: _Layout):
  """[P, g*bq, ...] -> [b, bq, n, ...] (inverse of _q_tile)."""
  x = jnp.moveaxis(x.reshape(lay.b, lay.kv, lay.g, lay.bq, *x.shape[2:]), 3, 1)
  return x.reshape(lay.b, lay.bq, lay.n, *x.shape[4:])


def _k_tile(x, j, lay: _Layout):
  """Key block j of [b, S, k, h] as [P, bk, h]."""
  x = jnp.moveaxis(lax.dynamic_slice_in_dim(x, j * lay.bk, lay.bk, axis=1), 1, 2)
  return x.reshape(lay.b * lay.kv, lay.bk, lay.h)


def _k_untile(x, lay: _Layout):
  """[P, bk, h] -> [b, bk, k, h] (inverse of _k_tile)."""
  return jnp.moveaxis(x.reshape(lay.b, lay.kv, lay.bk, lay.h), 2, 1)


def _info_tile(x, start, size: int, lay: _Layout):
  """Per-token ints [b|1, L] at [start, start + size) as [P, size] (shared rows broadcast to every P)."""
  if x is None:
    return None
  x = lax.dynamic_slice_in_dim(x, start, size, axis=1)
  return jnp.repeat(x, lay.kv, axis=0) if x.shape[0] > 1 else jnp.broadcast_to(x, (lay.b * lay.kv, size))


class _Inputs(NamedTuple):
  """The operands in their natural layout, lengths padded to whole blocks (ints by repeating the last token:
  padded queries never change a block's class and padded keys, masked by count, never widen its ranges)."""
  q: jax.Array  # [b, nq*bq, n, h]
  k: jax.Array  # [b, nk*bk, k, h]
  v: jax.Array
  q_pos: jax.Array  # i32[b|1, nq*bq]
  k_pos: jax.Array  # i32[b|1, nk*bk]
  q_seg: jax.Array | None
  k_seg: jax.Array | None


def _inputs(q, k, v, q_pos, k_pos, q_segment, k_segment, lay: _Layout) -> _Inputs:
  t_pad, s_pad = lay.nq * lay.bq, lay.nk * lay.bk
  ints = lambda x, size: None if x is None else _pad(jnp.asarray(x, jnp.int32), size, mode="edge")
  return _Inputs(_pad(q, t_pad), _pad(k, s_pad), _pad(v, s_pad), ints(q_pos, t_pad), ints(k_pos, s_pad),
                 ints(q_segment, t_pad), ints(k_segment, s_pad))


def _scaled_q_tile(x: _Inputs, i, lay: _Layout, scale: float):
  # Scaling each q tile (O(bq h)) instead of its logits (O(bq bk)), and not q as a whole (no extra copy of q);
  # forward and backward scale identically, so their logits (and the backward's p = exp(logits - lse)) agree.
  return _q_tile(x.q, i, lay) * jnp.asarray(scale, x.q.dtype)


def _q_info(x: _Inputs, i, lay: _Layout):
  return (_info_tile(x.q_pos, i * lay.bq, lay.bq, lay), _info_tile(x.q_seg, i * lay.bq, lay.bq, lay))


def _k_info(x: _Inputs, j, lay: _Layout):
  return (_info_tile(x.k_pos, j * lay.bk, lay.bk, lay), _info_tile(x.k_seg, j * lay.bk, lay.bk, lay))


class _Rules(NamedTuple):
  causal: bool
  window: int | None
  lay: _Layout
  head_loop: bool


def _k_count(j, rules: _Rules):
  """Real keys in key block j (the last block may be padded); None when no block is."""
  lay = rules.lay
  return None if lay.s % lay.bk == 0 else jnp.clip(lay.s - j * lay.bk, 0, lay.bk)


def _classify(q_pos, k_pos, q_seg, k_seg, k_count, rules: _Rules):
  return mask_lib.block_class(q_pos, k_pos, q_seg, k_seg, causal=rules.causal, sliding_window=rules.window,
                              k_count=k_count)


def _heads(fn, rules: _Rules, *args):
  """fn (written for one (batch row, key/value head) tile) over the leading P axis of every arg: vmapped into
  P-batched matmuls, or one tile at a time (`head_loop`, the CPU choice, so each tile stays in cache)."""
  return lax.map(lambda a: fn(*a), args) if rules.head_loop else jax.vmap(fn)(*args)


def _logits(qi, kj, q_pos, k_pos, q_seg, k_seg, k_count, rules: _Rules, masked: bool):
  """One tile's logits f32[g*bq, bk]; with `masked`, invisible pairs at -inf (the [bq, bk] mask serves all g)."""
  logits = jnp.einsum("qh,sh->qs", qi, kj, preferred_element_type=jnp.float32)
  if not masked:
    return logits
  bk = logits.shape[-1]
  vis = mask_lib.visible(q_pos, k_pos, q_seg, k_seg, causal=rules.causal, sliding_window=rules.window)
  if k_count is not None:
    vis = vis & (jnp.arange(bk) < k_count)
  return jnp.where(vis, logits.reshape(rules.lay.g, -1, bk), -jnp.inf).reshape(-1, bk)


def _forward_blocks(x: _Inputs, rules: _Rules, scale: float, out_dtype):
  """Returns out [b, nq*bq, n, h] (out_dtype) and lse f32[b, nq*bq, n]."""
  lay = rules.lay

  def q_block(outs, i):
    qi, (q_pos_i, q_seg_i) = _scaled_q_tile(x, i, lay, scale), _q_info(x, i, lay)

    def kv_step(carry, j):
      kj, vj, (k_pos_j, k_seg_j) = _k_tile(x.k, j, lay), _k_tile(x.v, j, lay), _k_info(x, j, lay)
      k_count = _k_count(j, rules)

      def tile(masked, qi, kj, vj, q_pos, k_pos, q_seg, k_seg, o, m, l):
        logits = _logits(qi, kj, q_pos, k_pos, q_seg, k_seg, k_count, rules, masked)
        m_new = jnp.maximum(m, logits.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.einsum("qs,sh->qh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
        return o * alpha[..., None] + pv, m_new, alpha * l + p.sum(-1)

      args = (qi, kj, vj, q_pos_i, k_pos_j, q_seg_i, k_seg_j)
      compute = lambda masked: lambda c: _heads(functools.partial(tile, masked), rules, *args, *c)
      cls = _classify(q_pos_i, k_pos_j, q_seg_i, k_seg_j, k_count, rules)
      return lax.switch(cls, [lambda c: c, compute(True), compute(False)], carry), None

    init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(qi.shape[:-1], jnp.float32))
    (o, m, l), _ = lax.scan(kv_step, init, jnp.arange(lay.nk))
    l_safe = jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
    new = (_q_untile((o / l_safe[..., None]).astype(out_dtype), lay), _q_untile(lse, lay))
    return tuple(lax.dynamic_update_slice_in_dim(a, b, i * lay.bq, axis=1) for a, b in zip(outs, new)), None

  outs = (jnp.zeros(x.q.shape, out_dtype), jnp.zeros(x.q.shape[:-1], jnp.float32))
  return lax.scan(q_block, outs, jnp.arange(lay.nq))[0]


def _backward_blocks(x: _Inputs, do, lse, delta, acc, rules: _Rules, scale: float):
  """Adds the gradients to acc = (dq [b, nq*bq, n, h], dk, dv [b, nk*bk, k, h]), all f32, and returns it.

  do, lse, delta: [b, nq*bq, n(, h)]; lse is +inf where a query saw no key (so p = 0 there).
  Outer loop over key blocks (dk, dv of one block in the carry), inner over query blocks; dq accumulates in
  place block by block, never as a stack of per-block partials.
  """
  lay = rules.lay

  def kv_block(acc, j):
    dq, dk, dv = acc
    kj, vj, (k_pos_j, k_seg_j) = _k_tile(x.k, j, lay), _k_tile(x.v, j, lay), _k_info(x, j, lay)
    k_count = _k_count(j, rules)

    def q_step(carry, i):
      dk_j, dv_j, dq = carry
      qi, (q_pos_i, q_seg_i) = _scaled_q_tile(x, i, lay, scale), _q_info(x, i, lay)
      do_i, lse_i, delta_i = (_q_tile(a, i, lay) for a in (do, lse, delta))

      def tile(masked, qi, kj, vj, q_pos, k_pos, q_seg, k_seg, do, lse, delta, dk, dv):
        p = jnp.exp(_logits(qi, kj, q_pos, k_pos, q_seg, k_seg, k_count, rules, masked) - lse[..., None])
        dv = dv + jnp.einsum("qs,qh->sh", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("qh,sh->qs", do, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        dq = jnp.einsum("qs,sh->qh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32) * scale
        dk = dk + jnp.einsum("qs,qh->sh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
        return dk, dv, dq

      args = (qi, kj, vj, q_pos_i, k_pos_j, q_seg_i, k_seg_j, do_i, lse_i, delta_i)
      compute = lambda masked: lambda a, b: _heads(functools.partial(tile, masked), rules, *args, a, b)
      cls = _classify(q_pos_i, k_pos_j, q_seg_i, k_seg_j, k_count, rules)

      # The switch returns this block's dq tile and dq is updated outside it: a conditional cannot update its
      # operand in place, so a dq passed through the switch would be copied whole at every block pair.
      skip = lambda dk_j, dv_j: (dk_j, dv_j, jnp.zeros(qi.shape, jnp.float32))
      dk_j, dv_j, dq_i = lax.switch(cls, [skip, compute(True), compute(False)], dk_j, dv_j)
      dq_i = _q_untile(dq_i, lay) + lax.dynamic_slice_in_dim(dq, i * lay.bq, lay.bq, axis=1)
      return (dk_j, dv_j, lax.dynamic_update_slice_in_dim(dq, dq_i, i * lay.bq, axis=1)), None

    dk_j, dv_j = _k_tile(dk, j, lay), _k_tile(dv, j, lay)
    (dk_j, dv_j, dq), _ = lax.scan(q_step, (dk_j, dv_j, dq), jnp.arange(lay.nq))
    put = lambda a, b: lax.dynamic_update_slice_in_dim(a, _k_untile(b, lay), j * lay.bk, axis=1)
    return (dq, put(dk, dk_j), put(dv, dv_j)), None

  return lax.scan(kv_block, acc, jnp.arange(lay.nk))[0]


def _setup(q, k, v, q_pos, k_pos, q_segment, k_segment, causal, sliding_window, block_q, block_k, scale,
           head_loop):
  mask_lib.check(q_pos, k_pos, q_segment, k_segment, causal=causal, sliding_window=sliding_window)
  lay = _layout(q, k, block_q, block_k)
  scale = lay.h ** -0.5 if scale is None else scale
  x = _inputs(q, k, v, q_pos, k_pos, q_segment, k_segment, lay)
  head_loop = default_head_loop(head_loop) and lay.b * lay.kv > 1
  return lay, _Rules(causal, sliding_window, lay, head_loop), x, scale


def flash_forward(q, k, v, q_pos, k_pos, *, causal: bool = True, block_q: int = 512, block_k: int = 512,
                  scale: float | None = None, head_loop: bool | None = None, q_segment=None, k_segment=None,
                  sliding_window: int | None = None):
  """Blockwise attention forward.

  Args: q [b,t,n,h]; k, v [b,s,k,h]; q_pos i32[b|1,t]; k_pos i32[b|1,s] (a batch of 1 is shared by all rows);
    q_segment, k_segment i32[b|1,t], [b|1,s] or None; sliding_window as lrjax.kernels.mask;
    head_loop: one (batch row, key/value head) at a time (None: on for the CPU backend, see the module doc).
  Returns: out [b,t,n,h] (q.dtype) and lse f32[b,t,n], the log-sum-exp of each query's scaled logits
    (-inf for a query that sees no key; its output is 0).
  """
  lay, rules, x, scale = _setup(q, k, v, q_pos, k_pos, q_segment, k_segment, causal, sliding_window, block_q,
                            block_k, scale, head_loop)
  out, lse = _forward_blocks(x, rules, scale, q.dtype)
  return out[:, :lay.t], lse[:, :lay.t]


def flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, *, causal: bool = True, block_q: int = 512,
                   block_k: int = 512, scale: float | None = None, head_loop: bool | None = None,
                   q_segment=None, k_segment=None, sliding_window: int | None = None, dq=None, dk=None, dv=None):
  """Blockwise attention backward from the (global) out and lse, added to the given accumulators.

  Args: as flash_forward, plus out [b,t,n,h], lse f32[b,t,n] and the output cotangent dout [b,t,n,h]; out and
    lse may come from a larger softmax than these keys (ring attention): the gradients are this key block's
    share. dq f32[b,t,n,h], dk, dv f32[b,s,k,h]: accumulators to add to (None: zeros).
  Returns: (dq, dk, dv), f32, the accumulators plus this block's gradients.
  """
  lay, rules, x, scale = _setup(q, k, v, q_pos, k_pos, q_segment, k_segment, causal, sliding_window,
                                  block_q, block_k, scale, head_loop)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [b,t,n]
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that saw no key get p = 0
  t_pad, s_pad = lay.nq * lay.bq, lay.nk * lay.bk
  per_q = (_pad(dout, t_pad), _pad(lse, t_pad), _pad(delta, t_pad))
  acc = step_lib.zeros_like_grads(q, k, dq, dk, dv)
  acc = _backward_blocks(x, *per_q, (_pad(acc[0], t_pad), _pad(acc[1], s_pad), _pad(acc[2], s_pad)), rules, scale)
  return acc[0][:, :lay.t], acc[1][:, :lay.s], acc[2][:, :lay.s]


@dataclasses.dataclass(frozen=True)
class Blockwise:
  """The blockwise kernel as a Step (lrjax.kernels.step): static mask rules, tiles and scale."""

  causal: bool = True
  sliding_window: int | None = None
  block_q: int = 512
  block_k: int = 512
  scale: float | None = None
  head_loop: bool | None = None

  def _kw(self, q_segment, k_segment):
    return dict(causal=self.causal, sliding_window=self.sliding_window, block_q=self.block_q,
                block_k=self.block_k, scale=self.scale, head_loop=self.head_loop, q_segment=q_segment,
                k_segment=k_segment)

  def forward(self, q, k, v, q_pos, k_pos, q_segment, k_segment):
    return flash_forward(q, k, v, q_pos, k_pos, **self._kw(q_segment, k_segment))

  def backward(self, q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse, dout, dq, dk, dv):
    return flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, dq=dq, dk=dk, dv=dv,
                          **self._kw(q_segment, k_segment))


def blockwise_attention(q, k, v, q_pos, k_pos, causal: bool = True, block_q: int = 512, block_k: int = 512,
                        scale: float | None = None, *, q_segment=None, k_segment=None,
                        sliding_window: int | None = None, head_loop: bool | None = None) -> jax.Array:
  """Memory-linear attention: O(t) activations in the forward and the backward. Shapes as flash_forward."""
  kernel = Blockwise(causal, sliding_window, block_q, block_k, scale, head_loop)
  return step_lib.fused(kernel, q, k, v, q_pos, k_pos, q_segment, k_segment)
