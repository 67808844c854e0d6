"""The interface every attention kernel offers, and the one custom VJP built on it.

A `Step` is one kernel with its static settings (mask rules, tiles, scale) bound. It computes attention of
queries against one block of keys and returns the log-sum-exp too, and its backward takes the (out, lse) of a
possibly larger softmax and adds this block's share of the gradients to given f32 accumulators. That is all
ring attention needs per ring step, and with a single block it is ordinary attention (`fused`).

Shapes as lrjax.attention: q [b, t, n, h]; k, v [b, s, k, h]; positions i32[b|1, t] / [b|1, s]; segment ids
i32[b|1, t] / [b|1, s] or None.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp


class Step(Protocol):
  """One attention kernel (a hashable value: it is a static argument of jit and custom_vjp)."""

  def forward(self, q, k, v, q_pos, k_pos, q_segment, k_segment) -> tuple[jax.Array, jax.Array]:
    """Returns out [b, t, n, h] (q.dtype) and lse f32[b, t, n] (-inf, and out 0, where a query sees no key)."""

  def backward(self, q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse, dout, dq, dk, dv):
    """Adds this key block's gradients to the f32 accumulators dq [b,t,n,h], dk, dv [b,s,k,h] (None: zeros).

    out, lse: of the whole softmax the block is part of; dout: the output cotangent. Returns (dq, dk, dv).
    """


def unsupported(step: Step, q, k) -> str | None:
  """Why `step` cannot run shapes q [b, t, n, h], k [b, s, k, h] (None: it can); arrays or ShapeDtypeStructs.

  Kernels with shape limits (the Pallas ones) say so through their own `unsupported` method; a kernel without
  one (blockwise) runs any shape.
  """
  check = getattr(step, "unsupported", None)
  return None if check is None else check(q, k)


def zeros_like_grads(q, k, dq=None, dk=None, dv=None):
  """The given accumulators, or f32 zeros shaped like q and k."""
  z = lambda a, x: jnp.zeros(x.shape, jnp.float32) if a is None else a
  return z(dq, q), z(dk, k), z(dv, k)


def merge(acc, new):
  """Online-softmax merge of two partial attentions (o [b,t,n,h], lse f32[b,t,n]) over disjoint keys (f32 out)."""
  o_a, lse_a = acc
  o_b, lse_b = new
  lse = jnp.logaddexp(lse_a, lse_b)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that have seen no key yet: both weights 0
  w_a = jnp.exp(lse_a - lse_safe)[..., None]
  w_b = jnp.exp(lse_b - lse_safe)[..., None]
  return o_a.astype(jnp.float32) * w_a + o_b.astype(jnp.float32) * w_b, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused(step: Step, q, k, v, q_pos, k_pos, q_segment=None, k_segment=None):
  """Attention with `step` as one kernel: O(t) residuals (q, k, v, out, lse), the backward recomputes."""
  return step.forward(q, k, v, q_pos, k_pos, q_segment, k_segment)[0]


def _fused_fwd(step, q, k, v, q_pos, k_pos, q_segment, k_segment):
  out, lse = step.forward(q, k, v, q_pos, k_pos, q_segment, k_segment)
  return out, (q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse)


def _fused_bwd(step, res, dout):
  q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse = res
  dq, dk, dv = step.backward(q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse, dout, None, None, None)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


fused.defvjp(_fused_fwd, _fused_bwd)
