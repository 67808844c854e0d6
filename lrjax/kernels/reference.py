"""Materialised softmax attention: the oracle every other kernel is tested against (O(t s) memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrjax.kernels import mask as mask_lib


def split_heads(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[b, t, n, h] -> [b, t, k, g, h], g = n // k query heads per key/value head (GQA without repeating keys)."""
  b, t, n, h = q.shape
  if n % num_kv_heads:
    raise mask_lib.MaskError(f"query heads {n} not divisible by key/value heads {num_kv_heads}")
  return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def reference_attention(q, k, v, q_pos, k_pos, *, causal: bool = True, scale: float | None = None,
                        k_valid=None, q_segment=None, k_segment=None, sliding_window: int | None = None):
  """Softmax attention with the whole [t, s] logits in f32.

  Args: q [b,t,n,h]; k, v [b,s,k,h]; q_pos i32[b|1,t]; k_pos i32[b|1,s]; k_valid optional bool[b,s] (key
    padding); segment ids and sliding_window as lrjax.kernels.mask.
  Returns: [b,t,n,h] in q.dtype; a query that sees no key gets 0.
  """
  mask_lib.check(q_pos, k_pos, q_segment, k_segment, causal=causal, sliding_window=sliding_window)
  b, t, n, h = q.shape
  scale = h ** -0.5 if scale is None else scale
  qg = split_heads(q, k.shape[2])
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  visible = mask_lib.visible(q_pos, k_pos, q_segment, k_segment, causal=causal, sliding_window=sliding_window)
  if k_valid is not None:
    visible = visible & k_valid[:, None, :]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(jnp.isnan(probs), 0, probs).astype(v.dtype)  # rows with no visible key
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h).astype(q.dtype)
