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
SCALING = R.RopeScaling("longrope", factor=4.0, original_max_position_embeddings=64,
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


@pytest.fixture(scope="module")
def hf_model(params, tmp_path_factory):
  """The same weights and longrope setting in transformers' LlamaForCausalLM (an independent implementation)."""
  import transformers
  from lrjax import weights
  path = tmp_path_factory.mktemp("decode") / "hf"
  weights.save_hf(path, CFG, jax.tree.map(np.asarray, params), rope_scaling=SCALING)
  return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _hf_generate(model, prompt, n, *, use_cache):
  import torch
  with torch.no_grad():
    ids = torch.as_tensor(prompt)
    # An explicit mask: generate would otherwise infer one from pad_token_id and mask every 0 in the prompt.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, use_cache=use_cache, pad_token_id=0)
  return out[:, prompt.shape[1]:].numpy()


@pytest.mark.parametrize("prompt_len, new", [(20, 12), (50, 30), (80, 12)])
def test_reprefill_equals_transformers_generate(params, hf_model, prompt_len, new):
  """Short factors within the window (20 + 12), crossing it (50 + 30 > 64), long beyond it (80 + 12):
  transformers picks the set from the current length at every step; without a cache that never mixes two sets,
  which is exactly the reprefill policy (a cache rebuilt at the switch)."""
  prompt = np.random.RandomState(prompt_len).randint(0, 64, (2, prompt_len))
  got = decode.greedy_generate(CFG, params, prompt, new, scaling=SCALING, policy="reprefill", pad_multiple=16)
  np.testing.assert_array_equal(got, _hf_generate(hf_model, prompt, new, use_cache=False))


def test_total_length_equals_transformers_cached_generate_with_the_final_set(params, hf_model, tmp_path):
  """The default policy binds the set chosen by the final length (long here: 50 + 30 > 64) to the whole
  sequence; transformers' cached generate with that set on both sides of its switch decodes the same."""
  import transformers
  from lrjax import weights
  long_only = SCALING.replace(short_factor=SCALING.long_factor)
  weights.save_hf(tmp_path / "long", CFG, jax.tree.map(np.asarray, params), rope_scaling=long_only)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "long", attn_implementation="eager").eval()
  prompt = np.random.RandomState(7).randint(0, 64, (2, 50))
  got = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, pad_multiple=16)
  np.testing.assert_array_equal(got, _hf_generate(model, prompt, 30, use_cache=True))


def test_unknown_policy(params):
  with pytest.raises(ValueError, match="unknown decoding policy"):
    decode.greedy_generate(CFG, params, np.zeros((1, 4), np.int32), 2, policy="sometimes")
