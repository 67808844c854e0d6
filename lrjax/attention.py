"""Attention: a materialised reference, memory-linear blockwise attention, and jax.nn.dot_product_attention.

Shapes (Gemma-style letters): b batch, t query length, s key length, n query heads, k key/value heads,
g = n // k query heads per key/value head, h head dim. q is [b, t, n, h]; k, v are [b, s, k, h]. Grouped-query
attention reshapes q to [b, t, k, g, h] so keys are never repeated in memory.

Causality is decided by global positions (q_pos >= k_pos), never by array index, so sequence sharding and
load-balanced (zig-zag) orders mask correctly.

The blockwise kernel is a FlashAttention-2 style online softmax in pure JAX with a custom VJP: the forward
keeps only (out, logsumexp), the backward recomputes each block. Both halves are exposed (`flash_forward`,
`flash_backward`) so ring attention can run them once per ring step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("reference", "blockwise", "xla", "cudnn")
_BIG_POS = jnp.iinfo(jnp.int32).max


def _split_heads(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, t, n, h = q.shape
  if n % num_kv_heads:
    raise ValueError(f"query heads {n} not divisible by key/value heads {num_kv_heads}")
  return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _mask(q_pos, k_pos, causal: bool, k_valid=None):
  """bool[b, 1, 1, t, s]: which keys each query may see."""
  b, t = q_pos.shape
  s = k_pos.shape[1]
  mask = jnp.ones((b, t, s), bool)
  if causal:
    mask = q_pos[:, :, None] >= k_pos[:, None, :]
  if k_valid is not None:
    mask = mask & k_valid[:, None, :]
  return mask[:, None, None]


def reference_attention(q, k, v, q_pos, k_pos, *, causal: bool = True, scale: float | None = None,
                        k_valid=None):
  """Materialised softmax attention (softmax in f32), the oracle for everything else.

  Args: q [b,t,n,h]; k, v [b,s,k,h]; q_pos i32[b,t]; k_pos i32[b,s]; k_valid optional bool[b,s].
  Returns: [b,t,n,h] in q.dtype.
  """
  b, t, n, h = q.shape
  scale = h ** -0.5 if scale is None else scale
  qg = _split_heads(q, k.shape[2])
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k) * jnp.asarray(scale, q.dtype)
  logits = jnp.where(_mask(q_pos, k_pos, causal, k_valid), logits.astype(jnp.float32), -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(jnp.isnan(probs), 0, probs).astype(v.dtype)  # rows with no visible key
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


# ----------------------------------------------------------------------------------------------------------
# Blockwise (flash) attention.


def _pad_to(x, multiple, axis, value=0):
  size = x.shape[axis]
  pad = (-size) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _to_blocks(x, block):
  """[b, t, ...] -> [t/block, b, block, ...]."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _from_blocks(x):
  """[nb, b, block, ...] -> [b, nb*block, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _block_sizes(t, s, block_q, block_k):
  return min(block_q, t), min(block_k, s)


def _prepare(q, k, v, q_pos, k_pos, block_q, block_k):
  b, t, n, h = q.shape
  s = k.shape[1]
  bq, bk = _block_sizes(t, s, block_q, block_k)
  qg = _split_heads(q, k.shape[2])
  k_valid = jnp.broadcast_to(jnp.arange(_pad_to(k_pos, bk, 1).shape[1]) < s, (b, s + (-s) % bk))
  blocks = dict(
      q=_to_blocks(_pad_to(qg, bq, 1), bq),
      q_pos=_to_blocks(_pad_to(q_pos, bq, 1), bq),
      k=_to_blocks(_pad_to(k, bk, 1), bk),
      v=_to_blocks(_pad_to(v, bk, 1), bk),
      k_pos=_to_blocks(_pad_to(k_pos, bk, 1, _BIG_POS), bk),
      k_valid=_to_blocks(k_valid, bk),
  )
  return blocks, bq, bk


def _visible(q_pos_blk, k_pos_blk, k_valid_blk, causal):
  """Whether any (query, key) pair in this block pair is unmasked (a scalar, for lax.cond)."""
  any_key = jnp.any(k_valid_blk)
  if not causal:
    return any_key
  min_k = jnp.min(jnp.where(k_valid_blk, k_pos_blk, _BIG_POS))
  return any_key & (jnp.max(q_pos_blk) >= min_k)


def _block_logits(qi, kj, q_pos_i, k_pos_j, k_valid_j, causal, scale):
  s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  mask = k_valid_j[:, None, None, None, :]
  if causal:
    mask = mask & (q_pos_i[:, None, None, :, None] >= k_pos_j[:, None, None, None, :])
  return jnp.where(mask, s, -jnp.inf)


def _head_major_blocks(q, k, v, q_pos, k_pos, bq, bk):
  """Blocks laid out for plain batched matmuls (batch dims leading, contraction innermost).

  The g query heads that share a key/value head become extra rows of one matrix, so each block step is
  two [b*k]-batched GEMMs ([g*bq, h] x [h, bk] and [g*bq, bk] x [bk, h]) with no per-step transposes;
  the one-off transposes here are O(t) while the steps are O(t^2).
  Returns q [nq, b, k, g*bq, h], k^T [nk, b, k, h, bk], v [nk, b, k, bk, h], q_pos [nq, b', bq],
  k_pos [nk, b', bk] (padding at _BIG_POS) and k_valid bool[nk, b', bk], with b' the positions' batch (b or 1).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  g = n // kv_heads
  nq, nk = -(-t // bq), -(-s // bk)
  qh = _pad_to(q, bq, 1).reshape(b, nq, bq, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5)
  kt = _pad_to(k, bk, 1).reshape(b, nk, bk, kv_heads, h).transpose(1, 0, 3, 4, 2)
  vh = _pad_to(v, bk, 1).reshape(b, nk, bk, kv_heads, h).transpose(1, 0, 3, 2, 4)
  # Positions may have batch 1 (shared by every row); they broadcast in the masks.
  qp = _pad_to(q_pos, bq, 1).reshape(q_pos.shape[0], nq, bq).transpose(1, 0, 2)
  kp = _pad_to(k_pos, bk, 1, _BIG_POS).reshape(k_pos.shape[0], nk, bk).transpose(1, 0, 2)
  k_valid = jnp.broadcast_to((jnp.arange(nk * bk) < s).reshape(nk, 1, bk), (nk, k_pos.shape[0], bk))
  return qh.reshape(nq, b, kv_heads, g * bq, h), kt, vh, qp, kp, k_valid


def _block_class(q_pos_blk, k_pos_blk, k_valid_blk, causal):
  """0: no (query, key) pair of the block pair is visible (skip); 1: some are (mask); 2: all are (no mask)."""
  if causal:
    visible = jnp.max(q_pos_blk) >= jnp.min(jnp.where(k_valid_blk, k_pos_blk, _BIG_POS))
    full = jnp.min(q_pos_blk) >= jnp.max(jnp.where(k_valid_blk, k_pos_blk, _BIG_POS))
  else:
    visible, full = jnp.bool_(True), jnp.bool_(True)
  visible = visible & jnp.any(k_valid_blk)
  full = full & jnp.all(k_valid_blk)
  return jnp.where(visible, jnp.where(full, 2, 1), 0)


def flash_forward(q, k, v, q_pos, k_pos, *, causal: bool = True, block_q: int = 512, block_k: int = 512,
                  scale: float | None = None, head_loop: bool | None = None):
  """Blockwise attention forward.

  Args: q [b,t,n,h]; k, v [b,s,k,h]; q_pos i32[b,t]; k_pos i32[b,s] (a batch of 1 is shared by all rows).
    head_loop: process one (batch row, key/value head) at a time, so each block step works on a
      [g*bq, bk] tile that stays in a CPU core's cache, instead of batching every head into each step (which
      accelerators want: one step = one large batched matmul). None: on for the CPU backend.
  Returns: out [b,t,n,h] (q.dtype) and lse f32[b,t,n], the log-sum-exp of each query's scaled logits
    (-inf for a query that sees no key; its output is 0).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  _split_heads(q, kv_heads)
  if head_loop is None:
    head_loop = jax.default_backend() == "cpu"
  kw = dict(causal=causal, block_q=block_q, block_k=block_k, scale=scale)
  if not head_loop or b * kv_heads == 1:
    return _flash_forward_batched(q, k, v, q_pos, k_pos, **kw)
  g = n // kv_heads
  # [b*k] independent problems of g query heads against one key/value head each; O(t) transposes.
  qs = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b * kv_heads, 1, t, g, h)
  ks = k.transpose(0, 2, 1, 3).reshape(b * kv_heads, 1, s, 1, h)
  vs = v.transpose(0, 2, 1, 3).reshape(b * kv_heads, 1, s, 1, h)
  row = jnp.arange(b * kv_heads) // kv_heads
  qp = jnp.asarray(q_pos)[row if q_pos.shape[0] > 1 else jnp.zeros_like(row)]
  kp = jnp.asarray(k_pos)[row if k_pos.shape[0] > 1 else jnp.zeros_like(row)]

  def one_head(args):
    qi, ki, vi, qpi, kpi = args
    return _flash_forward_batched(qi, ki, vi, qpi[None], kpi[None], **kw)

  out, lse = lax.map(one_head, (qs, ks, vs, qp, kp))  # [b*k, 1, t, g, h], [b*k, 1, t, g]
  out = out.reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
  lse = lse.reshape(b, kv_heads, t, g).transpose(0, 2, 1, 3).reshape(b, t, n)
  return out, lse


def _flash_forward_batched(q, k, v, q_pos, k_pos, *, causal, block_q, block_k, scale):
  """flash_forward with every (batch, head) in each block step: blocks [b, k, g*bq, bk]."""
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  _split_heads(q, kv_heads)  # validates the head ratio
  g = n // kv_heads
  scale = h ** -0.5 if scale is None else scale
  bq, bk = _block_sizes(t, s, block_q, block_k)
  qh, kt, vh, qp, kp, k_valid = _head_major_blocks(q, k, v, q_pos, k_pos, bq, bk)
  nq = qh.shape[0]
  # Scaling q once (O(t h)) instead of every logits block (O(t s)); the product is still formed in f32.
  qh = qh * jnp.asarray(scale, q.dtype)

  def q_block(args):
    qi, q_pos_i = args  # [b, k, g*bq, h], [b, bq]
    q_pos_rows = jnp.tile(q_pos_i, (1, g))  # [b, g*bq], the position of each row of qi

    def kv_step(carry, kv):
      kj, vj, k_pos_j, k_valid_j = kv

      def compute(carry, masked):
        o, m, l = carry
        logits = jnp.einsum("bkqh,bkhs->bkqs", qi, kj, preferred_element_type=jnp.float32)
        if masked:
          mask = k_valid_j[:, None, None, :]
          if causal:
            mask = mask & (q_pos_rows[:, None, :, None] >= k_pos_j[:, None, None, :])
          logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(-1)
        pv = jnp.einsum("bkqs,bksh->bkqh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
        return o * alpha[..., None] + pv, m_new, l

      # Fully visible blocks (most of a causal square) skip building and applying the mask.
      branches = [lambda c: c, lambda c: compute(c, True), lambda c: compute(c, False)]
      return lax.switch(_block_class(q_pos_i, k_pos_j, k_valid_j, causal), branches, carry), None

    init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(qi.shape[:-1], jnp.float32))
    (o, m, l), _ = lax.scan(kv_step, init, (kt, vh, kp, k_valid))
    l_safe = jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
    return (o / l_safe[..., None]).astype(q.dtype), lse

  out, lse = lax.map(q_block, (qh, qp))  # [nq, b, k, g*bq, h], [nq, b, k, g*bq]
  out = out.reshape(nq, b, kv_heads, g, bq, h).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, h)
  lse = lse.reshape(nq, b, kv_heads, g, bq).transpose(1, 0, 4, 2, 3).reshape(b, nq * bq, n)
  return out[:, :t], lse[:, :t]


def flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, *, causal: bool = True, block_q: int = 512,
                   block_k: int = 512, scale: float | None = None):
  """Blockwise attention backward from the (global) out and lse.

  Args: as flash_forward, plus out [b,t,n,h], lse f32[b,t,n] and the output cotangent dout [b,t,n,h].
    out and lse may come from a larger softmax than these keys (ring attention): the gradients returned are
    this key block's share.
  Returns: (dq f32[b,t,n,h], dk f32[b,s,k,h], dv f32[b,s,k,h]).
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  scale = h ** -0.5 if scale is None else scale
  blk, bq, bk = _prepare(q, k, v, q_pos, k_pos, block_q, block_k)
  kv_heads, groups = blk["q"].shape[3], blk["q"].shape[4]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [b,t,n]
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that saw no key get p = 0
  to_q_blocks = lambda x: _to_blocks(_pad_to(x.reshape(b, t, kv_heads, groups, *x.shape[3:]), bq, 1), bq)
  do_b, lse_b, delta_b = to_q_blocks(dout), to_q_blocks(lse), to_q_blocks(delta)

  def kv_block(dq_acc, kv):
    kj, vj, k_pos_j, k_valid_j = kv

    def q_step(carry, qs):
      qi, q_pos_i, do_i, lse_i, delta_i = qs

      def compute(carry):
        dk, dv = carry
        logits = _block_logits(qi, kj, q_pos_i, k_pos_j, k_valid_j, causal, scale)
        p = jnp.exp(logits - jnp.moveaxis(lse_i, 1, -1)[..., None])  # [b,k,g,q,s]
        dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_i.dtype), do_i,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.moveaxis(delta_i, 1, -1)[..., None]) * scale
        dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
        return (dk, dv), dq_i

      def skip(carry):
        return carry, jnp.zeros(qi.shape, jnp.float32)

      return lax.cond(_visible(q_pos_i, k_pos_j, k_valid_j, causal), compute, skip, carry)

    init = (jnp.zeros((b, bk, kv_heads, h), jnp.float32), jnp.zeros((b, bk, kv_heads, h), jnp.float32))
    (dk, dv), dq_parts = lax.scan(q_step, init, (blk["q"], blk["q_pos"], do_b, lse_b, delta_b))
    return dq_acc + dq_parts, (dk, dv)

  dq0 = jnp.zeros(blk["q"].shape, jnp.float32)
  dq, (dk, dv) = lax.scan(kv_block, dq0, (blk["k"], blk["v"], blk["k_pos"], blk["k_valid"]))
  dq = _from_blocks(dq)[:, :t].reshape(b, t, n, h)
  return dq, _from_blocks(dk)[:, :s], _from_blocks(dv)[:, :s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def blockwise_attention(q, k, v, q_pos, k_pos, causal=True, block_q=512, block_k=512, scale=None):
  """Memory-linear attention: O(t) activations in the forward and the backward. Shapes as reference."""
  return flash_forward(q, k, v, q_pos, k_pos, causal=causal, block_q=block_q, block_k=block_k,
                       scale=scale)[0]


def _blockwise_fwd(q, k, v, q_pos, k_pos, causal, block_q, block_k, scale):
  out, lse = flash_forward(q, k, v, q_pos, k_pos, causal=causal, block_q=block_q, block_k=block_k,
                           scale=scale)
  return out, (q, k, v, q_pos, k_pos, out, lse)


def _blockwise_bwd(causal, block_q, block_k, scale, res, dout):
  q, k, v, q_pos, k_pos, out, lse = res
  dq, dk, dv = flash_backward(q, k, v, q_pos, k_pos, out, lse, dout, causal=causal, block_q=block_q,
                              block_k=block_k, scale=scale)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention(q, k, v, q_pos, k_pos, *, implementation: str = "blockwise", causal: bool = True,
              block_q: int = 512, block_k: int = 512):
  """Dispatch on a static implementation name (from config). Shapes as reference_attention.

  "xla" and "cudnn" use jax.nn.dot_product_attention; they mask causally by index, which equals masking by
  position whenever q and k carry the same contiguous positions (a full forward without a cache).
  """
  if implementation == "reference":
    return reference_attention(q, k, v, q_pos, k_pos, causal=causal)
  if implementation == "blockwise":
    return blockwise_attention(q, k, v, q_pos, k_pos, causal, block_q, block_k, None)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                   f"{', '.join(IMPLEMENTATIONS)} (or 'ring' through lrjax.ring)")
