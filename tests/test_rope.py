"""rope.py against transformers 5 (inv_freq, attention factor, cos/sin, rotation) and hand-derived identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

from lrjax import rope

LONG = [1.0 + 0.5 * k for k in range(8)]
SHORT = [1.0 + 0.05 * k for k in range(8)]

# (transformers rope_parameters, our RopeScaling, config overrides); d = 16 unless head_dim is overridden.
CASES = {
    "default": ({"rope_type": "default"}, rope.RopeScaling(), {}),
    "default_theta5e5": ({"rope_type": "default", "rope_theta": 5e5}, rope.RopeScaling(), {}),
    "linear": ({"rope_type": "linear", "factor": 4.0}, rope.RopeScaling(method="linear", factor=4.0), {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, rope.RopeScaling(method="dynamic", factor=2.0),
                {"max_position_embeddings": 64}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
             rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=64), {}),
    "yarn_gpt_oss": ({"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0},
                     rope.RopeScaling(method="yarn", factor=32.0, original_max_position_embeddings=4096,
                                      truncate=False),
                     {"head_dim": 64, "max_position_embeddings": 131072}),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "attention_factor": 0.8, "beta_fast": 8.0, "beta_slow": 2.0},
                              rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=64,
                                               attention_factor=0.8, beta_fast=8.0, beta_slow=2.0), {}),
    "yarn_mscale_equal": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                           "mscale": 1.0, "mscale_all_dim": 1.0},
                          rope.RopeScaling(method="yarn", factor=40.0, original_max_position_embeddings=4096,
                                           mscale=1.0, mscale_all_dim=1.0),
                          {"head_dim": 64, "max_position_embeddings": 163840}),
    "yarn_mscale_ratio": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                           "mscale": 0.707, "mscale_all_dim": 1.0},
                          rope.RopeScaling(method="yarn", factor=40.0, original_max_position_embeddings=4096,
                                           mscale=0.707, mscale_all_dim=1.0),
                          {"head_dim": 64, "max_position_embeddings": 163840}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64},
               rope.RopeScaling(method="llama3", factor=8.0, original_max_position_embeddings=64),
               {"max_position_embeddings": 512}),
    "llama3_8b": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
                  rope.RopeScaling(method="llama3", factor=8.0, original_max_position_embeddings=8192),
                  {"head_dim": 128, "max_position_embeddings": 131072}),
    # transformers derives s = max_position_embeddings / original = 256 / 64; lrjax settings carry it explicitly.
    "longrope": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                  "original_max_position_embeddings": 64},
                 rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=64,
                                  short_factor=SHORT, long_factor=LONG), {}),
    "longrope_explicit": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 2.0,
                           "attention_factor": 1.3, "original_max_position_embeddings": 64},
                          rope.RopeScaling(method="longrope", factor=2.0, original_max_position_embeddings=64,
                                           short_factor=SHORT, long_factor=LONG, attention_factor=1.3), {}),
}


def _llama_config(params, **overrides):
  kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, intermediate_size=32,
            num_hidden_layers=1, vocab_size=32, max_position_embeddings=256)
  kw.update(overrides)
  return transformers.LlamaConfig(rope_parameters={"rope_theta": 10000.0, **params}, **kw)


def _theta(cfg):
  return cfg.rope_parameters["rope_theta"]


def _hf_init(cfg, seq_len=None):
  kind = cfg.rope_parameters["rope_type"]
  if kind == "default":
    inv, attn = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
  else:
    inv, attn = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)
  return inv.numpy(), float(attn)


def _ours(scaling, cfg, seq_len=None):
  return rope.inv_freq_and_attention_factor(scaling, dim=cfg.head_dim, theta=_theta(cfg),
                                            max_position_embeddings=cfg.max_position_embeddings, seq_len=seq_len)


def _device_cos_sin(scaling, positions, *, dim, theta, max_pos, seq_len=None):
  """cos/sin [b, t, d/2] from the device path, for a sequence whose length is max(positions)+1 by default."""
  positions = np.asarray(positions, np.int32)
  seq_len = int(positions.max()) + 1 if seq_len is None else seq_len
  arrays = rope.rope_arrays(scaling, dim=dim, theta=theta, n_layers=1, max_position_embeddings=max_pos,
                            seq_len=seq_len)
  arrays = jax.tree.map(jnp.asarray, arrays)
  cos, sin = jax.jit(rope.cos_sin)(jnp.asarray(positions), arrays.inv_freq[0], arrays)
  return np.asarray(cos), np.asarray(sin)


def _hf_cos_sin(module, positions):
  cos, sin = module(torch.zeros(1, dtype=torch.float32), torch.as_tensor(np.asarray(positions), dtype=torch.long))
  return cos.numpy(), sin.numpy()


# ------------------------------------------------------------------------------------------------------------
# Host side: inverse frequencies and attention factor.


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers(name):
  params, scaling, overrides = CASES[name]
  cfg = _llama_config(params, **overrides)
  seq_lens = {"dynamic": (None, 64, 65, 200, 5000), "longrope": (1, 64, 65, 256, 4096)}
  for seq in seq_lens.get(params["rope_type"], (None,)):
    hf_inv, hf_attn = _hf_init(cfg, seq)
    inv, attn = _ours(scaling, cfg, seq)
    assert inv.dtype == np.float32 and inv.shape == (cfg.head_dim // 2,)
    np.testing.assert_allclose(inv, hf_inv, rtol=1e-6, err_msg=f"seq_len={seq}")
    assert attn == pytest.approx(hf_attn, rel=1e-12), f"seq_len={seq}"


def test_longrope_switch_is_at_original_length():
  params, scaling, _ = CASES["longrope"]
  cfg = _llama_config(params)
  short, _ = _ours(scaling, cfg, 64)
  long, _ = _ours(scaling, cfg, 65)
  np.testing.assert_allclose(short, _hf_init(cfg, 64)[0], rtol=1e-6)
  np.testing.assert_allclose(long, _hf_init(cfg, 65)[0], rtol=1e-6)
  assert not np.allclose(short, long)


@pytest.mark.parametrize("method", ["linear", "yarn", "longrope"])
def test_partial_rotary_inv_freq(method):
  """Scaled types honour partial_rotary_factor: d = head_dim * factor."""
  params = {"linear": {"rope_type": "linear", "factor": 4.0},
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            "longrope": {"rope_type": "longrope", "short_factor": SHORT[:4], "long_factor": LONG[:4],
                         "original_max_position_embeddings": 64}}[method]
  cfg = _llama_config({**params, "partial_rotary_factor": 0.5})
  scaling = {"linear": rope.RopeScaling(method="linear", factor=4.0),
             "yarn": rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=64),
             "longrope": rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=64,
                                          short_factor=SHORT[:4], long_factor=LONG[:4])}[method]
  for seq in (10, 100):
    hf_inv, hf_attn = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, None, seq_len=seq)
    inv, attn = rope.inv_freq_and_attention_factor(scaling, dim=8, theta=10000.0, max_position_embeddings=256,
                                                   seq_len=seq)
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6)
    assert attn == pytest.approx(hf_attn, rel=1e-12)


def test_reference_vectors():
  """Published transformers 5.24 / 4.57 values (rope-scaling test vectors V1, V4, V5, V6), a second opinion."""
  default, _ = rope.inv_freq_and_attention_factor(rope.RopeScaling(), dim=16, theta=1e4)
  np.testing.assert_allclose(default, [1.0, 0.316227764, 0.100000001, 0.0316227786, 0.00999999978, 0.00316227786,
                                       0.00100000005, 0.000316227786], rtol=1e-7)
  yarn, attn = rope.inv_freq_and_attention_factor(CASES["yarn"][1], dim=16, theta=1e4, max_position_embeddings=256)
  np.testing.assert_allclose(yarn, [1.0, 0.237170815, 0.049999997, 0.00790569466, 0.00249999994, 0.000790569466,
                                    0.000250000012, 7.90569466e-05], rtol=1e-7)
  assert attn == pytest.approx(1.138629436111989, rel=1e-12)
  llama3, _ = rope.inv_freq_and_attention_factor(CASES["llama3"][1], dim=16, theta=1e4, max_position_embeddings=512)
  np.testing.assert_allclose(llama3, [1.0, 0.244384587, 0.0130422562, 0.00395284733, 0.00124999997,
                                      0.000395284733, 0.000125000006, 3.95284733e-05], rtol=1e-7)
  scaling = CASES["longrope"][1]
  cos64, _ = _device_cos_sin(scaling, [[10]], dim=16, theta=1e4, max_pos=256, seq_len=64)
  cos65, _ = _device_cos_sin(scaling, [[10]], dim=16, theta=1e4, max_pos=256, seq_len=65)
  np.testing.assert_allclose(cos64[0, 0], [-0.968876302, -1.14497209, 0.709520996, 1.11131895, 1.15069342,
                                           1.15433109, 1.15466642, 1.1546973], atol=1e-6)
  np.testing.assert_allclose(cos65[0, 0], [-0.968876302, -0.591084898, 1.013345, 1.14547527, 1.15405905,
                                           1.15465343, 1.15469694, 1.15470028], atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Device side: cos/sin tables and the rotation.


@pytest.mark.parametrize("name", ["default", "default_theta5e5", "linear", "dynamic", "yarn", "yarn_gpt_oss",
                                  "llama3", "llama3_8b"])
def test_cos_sin_match_llama_rotary_embedding(name):
  params, scaling, overrides = CASES[name]
  cfg = _llama_config(params, **overrides)
  positions = np.stack([np.arange(0, 5000, 37), np.arange(4999, -1, -37)])  # up to 4999, unsorted rows
  hf_cos, hf_sin = _hf_cos_sin(modeling_llama.LlamaRotaryEmbedding(cfg), positions)
  cos, sin = _device_cos_sin(scaling, positions, dim=cfg.head_dim, theta=_theta(cfg),
                             max_pos=cfg.max_position_embeddings)
  half = cfg.head_dim // 2
  np.testing.assert_array_equal(hf_cos[..., :half], hf_cos[..., half:])  # layout: angles repeat in halves
  # torch's float32 pow is off by an ulp for a few (d, b) (e.g. 2 of 32 entries at d=64, b=1.5e5): allow that ulp
  # times the position plus the angle product's own rounding (2 ulp of the angle, with margin) on top of cos/sin.
  inv, attn = _hf_init(cfg, int(positions.max()) + 1 if name == "dynamic" else None)
  tol = 2e-6 + attn * positions[..., None] * inv * 2.0 ** -21
  assert np.all(np.abs(cos - hf_cos[..., :half]) <= tol)
  assert np.all(np.abs(sin - hf_sin[..., :half]) <= tol)
  np.testing.assert_allclose(cos, hf_cos[..., :half], atol=1e-4)  # keeps the failure message readable


@pytest.mark.parametrize("dim, theta", [(16, 1e4), (64, 1e4), (128, 1e4), (128, 5e5)])
def test_default_inv_freq_is_bitwise_transformers(dim, theta):
  """An ulp of inv_freq is ~6e-4 rad of angle at position 5000: the host computation must round like torch."""
  cfg = _llama_config({"rope_type": "default", "rope_theta": theta}, head_dim=dim)
  np.testing.assert_array_equal(rope.default_inv_freq(dim, theta), _hf_init(cfg)[0])


@pytest.mark.parametrize("seq", [64, 65, 300])
def test_cos_sin_match_phi3_longrope_on_both_sides_of_the_switch(seq):
  cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                                original_max_position_embeddings=64, rope_theta=10000.0,
                                rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG})
  positions = np.arange(seq)[None]
  hf_cos, hf_sin = _hf_cos_sin(modeling_phi3.Phi3RotaryEmbedding(cfg), positions)
  cos, sin = _device_cos_sin(CASES["longrope"][1], positions, dim=16, theta=1e4, max_pos=256)
  np.testing.assert_allclose(cos, hf_cos[..., :8], atol=2e-6)
  np.testing.assert_allclose(sin, hf_sin[..., :8], atol=2e-6)


def _qk(b=2, t=12, n=3, h=16, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(b, t, n, h).astype(np.float32), rng.randn(b, t, n, h).astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_rope_matches_apply_rotary_pos_emb(dtype):
  cfg = _llama_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
  q, k = _qk()
  positions = np.stack([np.arange(1000, 1012), np.arange(7, 19)])
  hf_cos, hf_sin = _hf_cos_sin(modeling_llama.LlamaRotaryEmbedding(cfg), positions)
  to_hf = lambda x: torch.from_numpy(x.transpose(0, 2, 1, 3)).to(torch.bfloat16 if dtype == jnp.bfloat16 else
                                                                  torch.float32)
  tdt = to_hf(q).dtype
  hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(to_hf(q), to_hf(k), torch.from_numpy(hf_cos).to(tdt),
                                                   torch.from_numpy(hf_sin).to(tdt))
  cos, sin = _device_cos_sin(CASES["yarn"][1], positions, dim=16, theta=1e4, max_pos=256)
  our_q = rope.apply_rope(jnp.asarray(q, dtype), jnp.asarray(cos), jnp.asarray(sin))
  our_k = rope.apply_rope(jnp.asarray(k, dtype), jnp.asarray(cos), jnp.asarray(sin))
  assert our_q.dtype == dtype
  tol = 2e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(our_q, np.float32), hf_q.float().numpy().transpose(0, 2, 1, 3), atol=tol)
  np.testing.assert_allclose(np.asarray(our_k, np.float32), hf_k.float().numpy().transpose(0, 2, 1, 3), atol=tol)


def test_partial_rotary_apply_matches_phi3():
  cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                                partial_rotary_factor=0.5, rope_theta=10000.0)
  q, k = _qk()
  positions = np.stack([np.arange(300, 312), np.arange(12)])
  hf_cos, hf_sin = _hf_cos_sin(modeling_phi3.Phi3RotaryEmbedding(cfg), positions)
  assert hf_cos.shape[-1] == 8
  t = lambda x: torch.from_numpy(x.transpose(0, 2, 1, 3))
  hf_q, hf_k = modeling_phi3.apply_rotary_pos_emb(t(q), t(k), torch.from_numpy(hf_cos), torch.from_numpy(hf_sin))
  cos, sin = _device_cos_sin(rope.RopeScaling(), positions, dim=8, theta=1e4, max_pos=256)
  np.testing.assert_allclose(np.asarray(rope.apply_rope(jnp.asarray(q), cos, sin)),
                             hf_q.numpy().transpose(0, 2, 1, 3), atol=2e-6)
  np.testing.assert_allclose(np.asarray(rope.apply_rope(jnp.asarray(k), cos, sin)),
                             hf_k.numpy().transpose(0, 2, 1, 3), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(rope.apply_rope(jnp.asarray(q), cos, sin))[..., 8:], q[..., 8:])


# ------------------------------------------------------------------------------------------------------------
# Identities of the LongRoPE family, derived by hand.


def _inv(scaling, dim=16, theta=1e4, seq_len=None, max_pos=256):
  return rope.inv_freq_and_attention_factor(scaling, dim=dim, theta=theta, max_position_embeddings=max_pos,
                                            seq_len=seq_len)


def test_longrope_all_ones_is_plain_rope_and_uniform_is_pi():
  ones = rope.RopeScaling(method="longrope", long_factor=[1.0] * 8, attention_factor=1.0)
  np.testing.assert_array_equal(_inv(ones)[0], _inv(rope.RopeScaling())[0])
  uniform = rope.RopeScaling(method="longrope", long_factor=[4.0] * 8, attention_factor=1.0)
  np.testing.assert_allclose(_inv(uniform)[0], _inv(rope.RopeScaling(method="linear", factor=4.0))[0], rtol=1e-7)


def test_fixed_ntk_is_default_with_larger_base():
  s, d, b = 4.0, 16, 10000.0
  ntk, attn = _inv(rope.RopeScaling(method="ntk", factor=s), dim=d, theta=b)
  np.testing.assert_array_equal(ntk, _inv(rope.RopeScaling(), dim=d, theta=b * s ** (d / (d - 2)))[0])
  assert attn == 1.0
  # the lowest frequency is divided by exactly s, the highest is unchanged
  base, _ = _inv(rope.RopeScaling(), dim=d, theta=b)
  assert ntk[0] == base[0] and ntk[-1] == pytest.approx(base[-1] / s, rel=1e-6)


def test_n_hat_keeps_original_angles_and_magnitude_below_n_hat():
  factors = np.array([1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 8.0])
  scaling = rope.RopeScaling(method="longrope", factor=8.0, original_max_position_embeddings=64,
                             long_factor=factors, n_hat=5)
  positions = np.array([[0, 1, 4, 5, 6, 100, 511]])
  cos, sin = _device_cos_sin(scaling, positions, dim=16, theta=1e4, max_pos=512)
  # hand-derived (float64): θ_i = 1e4^(-2i/16); angle n·θ_i below n̂, n·θ_i/λ_i at or above, magnitude mscale
  theta_i = 1e4 ** (-np.arange(8) * 2 / 16)
  mscale = math.sqrt(1 + math.log(8) / math.log(64))
  n = positions[0][:, None].astype(np.float64)
  keep = n < 5
  angle = np.where(keep, n * theta_i, n * theta_i / factors)
  mag = np.where(keep, 1.0, mscale)
  np.testing.assert_allclose(cos[0], mag * np.cos(angle), atol=3e-6)
  np.testing.assert_allclose(sin[0], mag * np.sin(angle), atol=3e-6)
  np.testing.assert_allclose(np.hypot(cos[0], sin[0])[:3], 1.0, atol=1e-6)
  np.testing.assert_allclose(np.hypot(cos[0], sin[0])[3:], mscale, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="magic"), r"unknown rope method 'magic'"),
    (dict(method="longrope"), r"longrope needs long_factor"),
    (dict(method="longrope", long_factor=[1.0, float("nan")] * 4), r"long_factor contains NaN or inf"),
    (dict(method="longrope", long_factor=[1.0, 0.0] * 4), r"long_factor must be positive, found 0"),
    (dict(method="longrope", long_factor=[1.0] * 8, short_factor=[-1.0] * 8), r"short_factor must be positive"),
    (dict(method="longrope", long_factor=[1.0] * 8, temperature="hot"), r"unknown temperature policy 'hot'"),
    (dict(method="longrope", long_factor=[1.0] * 8, n_hat=-1), r"n_hat must be >= 0"),
    (dict(method="linear", factor=float("nan")), r"linear needs a positive finite factor"),
    (dict(method="yarn", factor=4.0), r"yarn needs original_max_position_embeddings"),
])
def test_bad_settings(kwargs, match):
  with pytest.raises(rope.RopeError, match=match):
    rope.RopeScaling(**kwargs)


def test_bad_factor_counts_and_rows():
  scaling = rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=64,
                             long_factor=[1.0] * 6)
  with pytest.raises(rope.RopeError, match=r"longrope factor count 6 != rotary_dim/2 = 8"):
    _inv(scaling)
  table = rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=64,
                           long_factor=np.ones((3, 8)))
  with pytest.raises(rope.RopeError, match=r"per-layer factors have 3 rows but the model has 2 layers"):
    rope.rope_arrays(table, dim=16, theta=1e4, n_layers=2)
  assert rope.rope_arrays(table, dim=16, theta=1e4, n_layers=3).inv_freq.shape == (3, 8)
