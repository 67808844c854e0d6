"""Blockwise attention against the materialised reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import attention as A


def _inputs(b=2, t=100, s=100, n=4, k=2, h=16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  kk = jax.random.normal(ks[1], (b, s, k, h))
  v = jax.random.normal(ks[2], (b, s, k, h))
  return q, kk, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("blocks", [(32, 16), (128, 128), (7, 9)])
def test_blockwise_matches_reference(causal, heads, blocks):
  q, k, v = _inputs(n=heads[0], k=heads[1])
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  fn_ref = lambda q, k, v: A.reference_attention(q, k, v, pos, pos, causal=causal)
  fn_blk = lambda q, k, v: A.blockwise_attention(q, k, v, pos, pos, causal, *blocks, None)
  np.testing.assert_allclose(fn_blk(q, k, v), fn_ref(q, k, v), atol=2e-6)
  loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
  g_ref = jax.grad(loss(fn_ref), argnums=(0, 1, 2))(q, k, v)
  g_blk = jax.grad(loss(fn_blk), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_blk, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_permuted_positions_mask_by_position_not_index():
  """A load-balanced order permutes tokens; masking by position must give the permuted reference output."""
  q, k, v = _inputs(b=1, t=64, s=64)
  pos = jnp.arange(64)[None]
  perm = jnp.asarray(np.random.RandomState(0).permutation(64))
  out = A.reference_attention(q, k, v, pos, pos)
  out_perm = A.blockwise_attention(q[:, perm], k[:, perm], v[:, perm], pos[:, perm], pos[:, perm], True, 16,
                                   16, None)
  np.testing.assert_allclose(out_perm, out[:, perm], atol=2e-6)


def test_lse_is_logsumexp_of_scaled_logits():
  q, k, v = _inputs(b=1, t=40, s=40, n=2, k=2)
  pos = jnp.arange(40)[None]
  _, lse = A.flash_forward(q, k, v, pos, pos, causal=True, block_q=16, block_k=8)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  logits = jnp.where(jnp.tril(jnp.ones((40, 40), bool)), logits, -jnp.inf)
  np.testing.assert_allclose(lse, jnp.moveaxis(jax.nn.logsumexp(logits, -1), 1, 2), rtol=1e-5)


def test_xla_dispatch_matches_reference():
  q, k, v = _inputs()
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  np.testing.assert_allclose(A.attention(q, k, v, pos, pos, implementation="xla"),
                             A.reference_attention(q, k, v, pos, pos), atol=2e-6)
  with pytest.raises(ValueError, match="unknown attention implementation"):
    A.attention(q, k, v, pos, pos, implementation="flash9")
