"""Next-token negative log-likelihood computed in sequence chunks.

A [tokens, vocab] logits array is never materialised: 128k tokens x 32k vocab in f32 would be 16 GB. Each
chunk's logits are built, reduced to per-token NLL and dropped; under differentiation the chunk is
rematerialised in the backward pass, so training memory is linear in the chunk size too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                chunk: int = 2048) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted next-token NLL and of weights, per sequence.

  Args:
    hidden: [b, t, D] final hidden states (already normed).
    head: [D, V] vocab projection.
    targets: i32[b, t], the token each position predicts.
    weights: f32[b, t] per-token weights (0 drops a token, e.g. padding or context-only tokens).
    chunk: tokens per chunk along t.
  Returns:
    (nll_sum f32[b], count f32[b]); sum them across documents and shards before dividing.
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  pad = (-t) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_nll(h, y, w):
    logits = jnp.einsum("bcd,dv->bcv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * w, axis=-1)

  def body(acc, xs):
    return acc + chunk_nll(*xs), None

  weights = weights.astype(jnp.float32)
  nll, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (split(hidden), split(targets), split(weights)))
  return nll, jnp.sum(weights, axis=-1)
