"""KV-cache greedy decoding equals full recomputation, and never mixes two factor sets in one cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import decode
from lrjax import model as M
from lrjax import rope as R

CFG = M.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=256, block_q=16, block_k=16)
SCALING = R.RopeScaling("longrope", factor=None, original_max_position_embeddings=64,
                        long_factor=np.linspace(1, 4, 8), short_factor=np.linspace(1, 1.5, 8))


@pytest.fixture(scope="module")
def params():
  p = M.init_params(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda a: a * 3 if a.ndim > 1 else a, p)  # sharper distributions: fewer argmax ties


@jax.jit
def _last_logits(params, seq, length, rope):
  """Logits at position length-1 of a right-padded sequence (causal: padding after it changes nothing)."""
  pos = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
  return jax.lax.dynamic_index_in_dim(M.logits(CFG, params, seq, pos, rope), length - 1, 1, False)


def _recompute(params, prompt, n, set_length):
  """Greedy decoding by full forward passes; set_length(current_len) picks the factor set each step."""
  seq, out = prompt, []
  for _ in range(n):
    length = seq.shape[1]
    rope = jax.tree.map(jnp.asarray, CFG.rope_arrays(SCALING, seq_len=set_length(length)))
    padded = np.pad(seq, ((0, 0), (0, 96 - length)))
    tok = np.asarray(jnp.argmax(_last_logits(params, jnp.asarray(padded), length, rope), -1))
    out.append(tok)
    seq = np.concatenate([seq, tok[:, None]], 1)
  return np.stack(out, 1)


def test_cache_equals_recompute_total_length_policy(params):
  prompt = np.random.RandomState(0).randint(0, 64, (2, 50))
  got = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, pad_multiple=16)
  np.testing.assert_array_equal(got, _recompute(params, prompt, 30, lambda _: 80))


def test_reprefill_crosses_switch_without_mixing(params):
  """Crossing original_max_position_embeddings (64) mid-generation: the cache is rebuilt with long factors."""
  prompt = np.random.RandomState(1).randint(0, 64, (2, 50))
  got = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, policy="reprefill", pad_multiple=16)
  # transformers' rule: the set follows the current length (short while <= 64, long after).
  np.testing.assert_array_equal(got, _recompute(params, prompt, 30, lambda n: n))
  static = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, pad_multiple=16)
  assert not np.array_equal(got, static), "the switch should change the continuation"


def test_mixed_cache_would_be_detected(params):
  """Guard on the test itself: decoding past the switch with the short-factor cache diverges from recompute."""
  prompt = np.random.RandomState(1).randint(0, 64, (2, 50))
  short = R.RopeScaling("longrope", factor=None, original_max_position_embeddings=64,
                        long_factor=SCALING.short_factor)
  stale = decode.greedy_generate(CFG, params, prompt, 30, scaling=short, pad_multiple=16)
  assert not np.array_equal(stale, _recompute(params, prompt, 30, lambda n: n))


def test_unknown_policy(params):
  with pytest.raises(ValueError, match="unknown decoding policy"):
    decode.greedy_generate(CFG, params, np.zeros((1, 4), np.int32), 2, policy="sometimes")
