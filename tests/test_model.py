"""Model logits against transformers LlamaForCausalLM (fp32, CPU), loaded through weights.load_hf.

Each reference model is saved with save_pretrained and read back by our loader, so these tests cover the config
mapping, the tensor layout and the forward pass together. One jitted forward is shared: the RoPE arrays carry
the scaling, so the static config is normalised to the plain scaling and every scaling type reuses one program
per (architecture, shape).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lrjax import model, rope, weights

LOGITS = jax.jit(model.logits, static_argnums=0)
B = 2


def _hf_model(directory, max_shard_size=None, **overrides):
  kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, rms_norm_eps=1e-5,
            initializer_range=0.1)
  kw.update(overrides)
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  with torch.no_grad():  # non-trivial norm weights, so a swapped or dropped norm shows
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  m.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  return m


def _tokens(t, seed=0):
  return np.random.RandomState(seed).randint(0, 64, (B, t)).astype(np.int32)


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def _ours(cfg, params, tokens, scaling=None, seq_len=None, positions=None):
  t = tokens.shape[1]
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape) if positions is None else positions
  arrays = cfg.rope_arrays(scaling, seq_len=seq_len or int(positions.max()) + 1)
  static = cfg.replace(rope_scaling=rope.RopeScaling())  # the arrays carry the scaling
  return np.asarray(LOGITS(static, params, jnp.asarray(tokens), jnp.asarray(positions),
                           jax.tree.map(jnp.asarray, arrays)))


ARCHS = {
    "mha": dict(num_key_value_heads=4),
    "gqa_sharded": dict(num_key_value_heads=2),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "theta_5e5": dict(rope_theta=500000.0),
    "head_dim_32": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_architectures_match_transformers(tmp_path, name):
  m = _hf_model(tmp_path, max_shard_size="20KB" if "sharded" in name else None, **ARCHS[name])
  if "sharded" in name:
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 4
  cfg, params = weights.load_hf(tmp_path)
  if "tied" in name:
    assert cfg.tie_word_embeddings and "lm_head" not in params
  if name == "head_dim_32":
    assert cfg.head_dim == 32 and params["layers"]["q"].shape == (2, 64, 4, 32)
  tokens = _tokens(24)
  ref = _hf_logits(m, tokens)
  out = _ours(cfg, params, tokens)
  np.testing.assert_allclose(out, ref, atol=1e-4)
  assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero arrays



def test_token_layouts_match_transformers(tmp_path):
  """Both layouts of the token projections match transformers: one [b*t] token axis (what XLA's CPU backend
  takes, so every other test here runs it) and [b, t] (what TPU/GPU and a sharded sequence take)."""
  from lrjax import sharding
  assert model.cpu_lowering()
  with sharding.mesh_context(sharding.make_mesh({"sequence": 2, "fsdp": -1})):
    assert not model.cpu_lowering()
  m = _hf_model(tmp_path, num_key_value_heads=2)
  cfg, params = weights.load_hf(tmp_path)
  tokens = _tokens(24)
  ref = _hf_logits(m, tokens)
  positions = jnp.asarray(np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape))
  arrays = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=24))
  for layout in model.TOKEN_LAYOUTS:
    out = jax.jit(model.logits, static_argnums=0)(cfg.replace(token_layout=layout), params, jnp.asarray(tokens),
                                                  positions, arrays)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, err_msg=layout)
  with pytest.raises(ValueError, match="unknown token_layout 'tb'"):
    cfg.replace(token_layout="tb")

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 24,
                 "short_factor": [1.0 + 0.1 * k for k in range(8)],
                 "long_factor": [1.0 + 2.0 * k for k in range(8)]},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scalings_match_transformers(tmp_path, name):
  """Every scaling read from config.json; 24 tokens is at/below every switch point, 40 beyond (dynamic: > 32)."""
  m = _hf_model(tmp_path, rope_scaling=SCALINGS[name])
  cfg, params = weights.load_hf(tmp_path)
  assert cfg.rope_scaling.method == name
  for t in (24, 40):
    tokens = _tokens(t, seed=t)
    np.testing.assert_allclose(_ours(cfg, params, tokens), _hf_logits(m, tokens), atol=1e-4,
                               err_msg=f"{t} tokens")
  if name == "longrope":  # the two sides really use different factors
    short = cfg.rope_arrays(seq_len=24).inv_freq
    long = cfg.rope_arrays(seq_len=25).inv_freq
    assert not np.allclose(short, long)


def test_bf16_compute_is_close(tmp_path):
  m = _hf_model(tmp_path)
  cfg, params = weights.load_hf(tmp_path, dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
  tokens = _tokens(24)
  ref = _hf_logits(m, tokens)
  out = _ours(cfg.replace(dtype="bfloat16"), params, tokens)
  assert out.dtype == np.float32
  scale = np.abs(ref).max()
  assert np.abs(out - ref).max() < 0.03 * scale
  assert np.abs(out - ref).max() > 1e-5 * scale  # it really ran in bf16


@pytest.fixture(scope="module")
def longrope_model(tmp_path_factory):
  directory = tmp_path_factory.mktemp("longrope")
  _hf_model(directory)
  return weights.load_hf(directory)


def test_each_longrope_parameter_changes_logits_without_recompiling(longrope_model):
  """Every factor (and n̂, and the temperature) reaches the logits; new values never recompile."""
  cfg, params = longrope_model
  tokens = _tokens(40, seed=1)
  base = rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=8,
                          long_factor=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  # lowest frequency 1e4^(-14/16) = 3e-4 rad/token; positions far apart enough for it to turn: 0..39 and
  # a second row at 2000..2039 where n̂ below mixes absolute and relative angles
  positions = np.stack([np.arange(40), np.arange(2000, 2040)]).astype(np.int32)
  ref = _ours(cfg, params, tokens, base, positions=positions)
  compiled = LOGITS._cache_size()
  diffs = []
  for i in range(8):
    changed = list(base.long_factor)
    changed[i] = 2.0
    diffs.append(np.abs(_ours(cfg, params, tokens, base.replace(long_factor=changed), positions=positions)
                        - ref).max())
  diffs.append(np.abs(_ours(cfg, params, tokens, base.replace(n_hat=4), positions=positions) - ref).max())
  diffs.append(np.abs(_ours(cfg, params, tokens, base.replace(temperature=1.2), positions=positions) - ref).max())
  assert LOGITS._cache_size() == compiled, "a new factor set recompiled the forward pass"
  assert min(diffs) > 1e-4, f"max |Δlogits| per change: {np.round(diffs, 6)}"
  np.testing.assert_array_equal(_ours(cfg, params, tokens, base, positions=positions), ref)  # deterministic


def test_longrope_with_unit_factors_is_the_plain_model(longrope_model):
  cfg, params = longrope_model
  tokens = _tokens(24, seed=2)
  ones = rope.RopeScaling(method="longrope", long_factor=[1.0] * 8, attention_factor=1.0)
  np.testing.assert_allclose(_ours(cfg, params, tokens, ones), _ours(cfg, params, tokens), atol=1e-6)
