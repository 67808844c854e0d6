"""Chunked NLL equals a naive full-logits NLL, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import loss


def _naive(h, w_head, y, w):
  logp = jax.nn.log_softmax(h @ w_head)
  return -(jnp.take_along_axis(logp, y[..., None], -1)[..., 0] * w).sum(-1)


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_nll_matches_naive(chunk):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  h = jax.random.normal(k[0], (2, 37, 8))
  w_head = jax.random.normal(k[1], (8, 11))
  y = jax.random.randint(k[2], (2, 37), 0, 11)
  w = (jax.random.uniform(k[3], (2, 37)) > 0.3).astype(jnp.float32)
  nll, count = loss.chunked_nll(h, w_head, y, w, chunk=chunk)
  np.testing.assert_allclose(nll, _naive(h, w_head, y, w), rtol=1e-5)
  np.testing.assert_allclose(count, w.sum(-1))
  g = jax.grad(lambda h, wh: loss.chunked_nll(h, wh, y, w, chunk)[0].sum(), argnums=(0, 1))(h, w_head)
  g_ref = jax.grad(lambda h, wh: _naive(h, wh, y, w).sum(), argnums=(0, 1))(h, w_head)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5)
