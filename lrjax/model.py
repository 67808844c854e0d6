"""A pure-functional Flax (linen) LLaMA-family decoder: LLaMA 1/2/3, Mistral, Phi-3, Qwen2; any GQA ratio.

Parameters are one flat pytree with every decoder layer stacked on a leading axis, whatever the execution
choice (scan or unrolled), so checkpoints never depend on it:

  embed            [V, D]
  layers/attn_norm [L, D]        layers/q [L, D, N, H]   layers/k, layers/v [L, D, K, H]
  layers/q_bias    [L, N, H]     layers/k_bias, layers/v_bias [L, K, H]       (qkv_bias: Qwen2)
  layers/o         [L, N, H, D]  layers/mlp_norm [L, D]  layers/gate, layers/up [L, D, F]
  layers/down      [L, F, D]
  final_norm       [D]
  lm_head          [D, V]        (absent when embeddings are tied)

The architectures differ only in what the checkpoint mapping (lrjax.weights.arch) and these few fields say:
q/k/v biases, a partial rotary dim (the first rotary_dim dims of each head rotate; Phi-4-mini), and a sliding
attention window (Mistral, Phi-3).

Positions are an input (global positions: sequence sharding, n̂ and the LongRoPE switch all need the true
position) and so are the RoPE arrays (traced: a new factor set never recompiles).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lrjax import attention as attention_lib
from lrjax import axes
from lrjax import kv_cache
from lrjax import rope as rope_lib

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_proj")


TOKEN_LAYOUTS = ("auto", "bt", "flat")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture (as in a Hugging Face LlamaConfig) plus execution choices.

  Architecture: vocab_size V, hidden_size D, intermediate_size F, num_layers L, num_heads N, num_kv_heads K,
  head_dim H, rope_theta, partial_rotary_factor, rms_norm_eps, tie_word_embeddings, max_position_embeddings,
  original_max_position_embeddings (the pre-training window every RoPE-scaling rule measures s against; None
  means max_position_embeddings; see `original_length`), rope_scaling (the checkpoint's own scaling), bos/eos
  token ids.
  qkv_bias (Qwen2's q/k/v projection biases), sliding_window (each query sees itself and the window-1 previous
  positions; None = full causal attention), architecture (the checkpoint family the weights map to and from:
  llama, mistral, phi3, qwen2; host-side only).
  Execution: dtype (compute) and param_dtype; attention implementation (lrjax.attention.IMPLEMENTATIONS:
  "auto" picks the fast kernel of the backend, "ring[:kernel]" rotates K/V over the mesh's sequence axis) and its
  block sizes; scan_layers (lax.scan vs unrolled); remat policy; the mesh axis that ring attention rotates over.
  """

  vocab_size: int = 256
  hidden_size: int = 256
  intermediate_size: int = 768
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  # Host-side only (rope_arrays); excluded from eq/hash so jitted functions taking the config as a static
  # argument do not recompile per scaling or window.
  original_max_position_embeddings: int | None = dataclasses.field(default=None, compare=False)
  rope_scaling: rope_lib.RopeScaling = dataclasses.field(default=rope_lib.RopeScaling(), compare=False)
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  qkv_bias: bool = False
  sliding_window: int | None = None
  architecture: str = dataclasses.field(default="llama", compare=False)
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "blockwise"
  block_q: int = 512
  block_k: int = 512
  scan_layers: bool = True
  remat: str = "none"
  sequence_axis: str = "sequence"
  # Token projections: "auto" = one [b*t] axis where cpu_lowering() says so, else [b, t]; "bt" / "flat" force
  # one (dry runs compile the accelerators' layout on simulated CPU devices). Same results either way.
  token_layout: str = "auto"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
      raise ValueError(f"rotary dim {self.rotary_dim} must be even and within head_dim {self.head_dim}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"unknown attention implementation {self.attention!r}; expected one of "
                       f"{', '.join(attention_lib.IMPLEMENTATIONS)}")
    if self.token_layout not in TOKEN_LAYOUTS:
      raise ValueError(f"unknown token_layout {self.token_layout!r}; expected one of {', '.join(TOKEN_LAYOUTS)}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window}")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def original_length(self) -> int:
    """L, the original (pre-training) context window in tokens: PI/NTK/YaRN use s = length / L, factor files'
    temperatures and the short/long switch are measured against it."""
    return int(self.original_max_position_embeddings or self.max_position_embeddings)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def rope_arrays(self, scaling: rope_lib.RopeScaling | None = None,
                  seq_len: int | None = None) -> rope_lib.RopeArrays:
    """Host-side RopeArrays for `scaling` (default: the checkpoint's own) at a sequence length.

    The setting is resolved against this model's original window (rope.resolve); a longrope setting must
    already carry its extension ratio (there is no target length here to derive it from).
    """
    scaling = rope_lib.resolve(self.rope_scaling if scaling is None else scaling,
                               original_length=self.original_length)
    return rope_lib.rope_arrays(scaling, dim=self.rotary_dim, theta=self.rope_theta, n_layers=self.num_layers,
                                max_position_embeddings=self.max_position_embeddings, seq_len=seq_len)

  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    bias = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
    per_layer = attn + bias + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d


PARAM_AXES = axes.PARAM_AXES  # the table lives in lrjax.axes (shared with lrjax.sharding)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """transformers' LlamaRMSNorm: normalise in f32, cast back, then scale."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * y.astype(x.dtype)


def _remat_policy(name: str):
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "save_proj": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
  }[name]


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


def cpu_lowering(sequence_axis: str = axes.SEQUENCE_AXIS) -> bool:
  """Whether this trace takes the CPU layout choice: the default backend is the CPU and the mesh (if any) does
  not shard the sequence. Other backends never take it.

  On XLA's CPU backend, a weight gradient that contracts two token axes (b, t) is lowered through transposed
  copies of both operands (measured: 1.56x the CPU time of the built-in model's train step); one [b*t] axis is one
  dot (`dense`). A sharded sequence keeps the [b, t] layout (merging a sharded t into b would move activations).
  """
  if jax.default_backend() != "cpu":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.shape.get(sequence_axis, 1) == 1


def dense(spec: str, x: jax.Array, w: jax.Array, *, flat: bool, **kw) -> jax.Array:
  """jnp.einsum(spec, x, w) for tokens x [b, t, ...] ("bt" leading in spec) and a weight w without token axes.

  flat: contract on x reshaped to one token axis [b*t, ...] (see cpu_lowering); the result is the same.
  """
  if not flat:
    return jnp.einsum(spec, x, w, **kw)
  y = jnp.einsum(spec.replace("bt", "t"), x.reshape(-1, *x.shape[2:]), w, **kw)
  return y.reshape(*x.shape[:2], *y.shape[1:])


def decoder_layer(x: jax.Array, p: dict, positions: jax.Array, inv_freq: jax.Array,
                  rope: rope_lib.RopeArrays, cfg: ModelConfig, cache: dict | None = None,
                  cache_index: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  original: jax.Array | None = None, layer: jax.Array | int | None = None):
  """One pre-norm decoder layer.

  Args:
    x: [b, t, D] residual stream (compute dtype).
    p: this layer's parameters (layer axis removed).
    positions: i32[b, t] global positions of x's tokens.
    inv_freq: f32[d/2], this layer's scaled inverse frequencies.
    rope: the remaining RopeArrays (base frequencies, mscale, n̂).
    cache: optional whole KV cache (all layers; lrjax.kv_cache): this layer's new keys are written at
      cache_index and its queries attend over the layer's slots (sharded over the mesh's sequence axis with
      ring attention); `layer` is this layer's index into it.
    segment_ids: optional i32[b, t] document ids (packed rows): attention stays within a document.
    original: optional bool[b, t]: tokens that keep the original RoPE (LongRoPE2 mixed context window).
  Returns:
    (x [b, t, D], updated cache or None).
  """
  dt = jnp.dtype(cfg.dtype)
  w = lambda name: p[name].astype(dt)
  cpu = cpu_lowering(cfg.sequence_axis) if cfg.token_layout == "auto" else cfg.token_layout == "flat"

  def project(name, spec):
    y = dense(spec, h, w(name), flat=cpu)
    return checkpoint_name(y + w(f"{name}_bias") if cfg.qkv_bias else y, "qkv")

  h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  q, k, v = project("q", "btd,dnh->btnh"), project("k", "btd,dkh->btkh"), project("v", "btd,dkh->btkh")
  q = _constrain(q, ("batch", "length", "q_heads", "head_dim"))
  k = _constrain(k, ("batch", "length", "kv_heads", "head_dim"))
  v = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))
  cos, sin = rope_lib.cos_sin(positions, inv_freq, rope, original)
  q, k = rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin)
  kw = dict(block_q=cfg.block_q, block_k=cfg.block_k, sliding_window=cfg.sliding_window)
  if cache is not None:
    shards = kv_cache.shards(cfg)
    cache = kv_cache.write(cache, layer, k, v, positions, cache_index, shards)
    a = kv_cache.attend(q, positions, cache, layer, cfg, shards)
  else:
    a = attention_lib.attention(q, k, v, positions, positions, implementation=cfg.attention,
                                q_segment=segment_ids, k_segment=segment_ids, axis_name=cfg.sequence_axis, **kw)
  a = checkpoint_name(dense("btnh,nhd->btd", a, w("o"), flat=cpu), "attn_out")
  x = _constrain(x + a, ("batch", "length", "embed"))
  h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  gate = dense("btd,df->btf", h, w("gate"), flat=cpu)
  up = dense("btd,df->btf", h, w("up"), flat=cpu)
  hidden = checkpoint_name(_constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp")), "mlp_hidden")
  x = _constrain(x + dense("btf,fd->btd", hidden, w("down"), flat=cpu), ("batch", "length", "embed"))
  return x, cache


class Llama(nn.Module):
  """LLaMA-family decoder. __call__ returns final-normed hidden states (`head_weights` gives the projection)."""

  config: ModelConfig

  def setup(self):
    c = self.config
    pd = jnp.dtype(c.param_dtype)
    init = nn.initializers.normal(0.02)
    L, D, N, K, H, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                           c.intermediate_size, c.vocab_size)
    self.embed = self.param("embed", init, (V, D), pd)
    self.final_norm = self.param("final_norm", nn.initializers.ones, (D,), pd)
    if not c.tie_word_embeddings:
      self.lm_head = self.param("lm_head", init, (D, V), pd)
    shapes = {"attn_norm": (L, D), "q": (L, D, N, H), "k": (L, D, K, H), "v": (L, D, K, H),
              "o": (L, N, H, D), "mlp_norm": (L, D), "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D)}
    if c.qkv_bias:
      shapes.update(q_bias=(L, N, H), k_bias=(L, K, H), v_bias=(L, K, H))
    self.layers = self.param("layers", _layers_init(shapes, pd))

  def __call__(self, tokens: jax.Array, positions: jax.Array, rope: rope_lib.RopeArrays,
               cache: dict | None = None, cache_index: jax.Array | None = None,
               segment_ids: jax.Array | None = None, original: jax.Array | None = None):
    """Args:
      tokens: i32[b, t]; positions: i32[b, t] global positions; rope: RopeArrays (inv_freq [L, d/2]).
      cache: optional {"k","v": [L, b, S, K, H], "pos": i32[L, b, S]}; cache_index: where t new tokens go
        (lrjax.kv_cache: the layout, and the write rule when the cache is sharded over the sequence axis).
      segment_ids: optional i32[b, t] document ids of packed rows (attention within a document only).
      original: optional bool[b, t] tokens that keep the original RoPE (LongRoPE2 mixed context window).
    Returns:
      hidden f32/compute-dtype [b, t, D] (after the final norm), and the updated cache (None without one).
    """
    c = self.config
    if cache is not None and segment_ids is not None:
      raise ValueError("segment ids (packed documents) are a training input; decoding with a cache takes none")
    dt = jnp.dtype(c.dtype)
    x = jnp.take(self.embed, tokens, axis=0, mode="clip").astype(dt)
    x = _constrain(x, ("batch", "length", "embed"))

    def body(carry, layer):
      x, cache = carry
      p, inv_freq, layer_positions, layer_segments, layer_original, index = layer
      return decoder_layer(x, p, layer_positions, inv_freq, rope, c, cache, cache_index, layer_segments,
                           layer_original, index), None

    if c.remat != "none":
      body = jax.checkpoint(body, policy=_remat_policy(c.remat), prevent_cse=not c.scan_layers)
    # Positions (and segment ids) enter the layer scan as per-layer inputs, not closed-over constants: under
    # grad, scan's partial evaluation hoists everything computed from loop constants out of the loop, which
    # would materialise every attention block's mask at once (O(t^2) memory). [L, b, t] ints cost nothing.
    per_layer = lambda a: None if a is None else jnp.broadcast_to(a, (c.num_layers,) + a.shape)
    # The cache rides in the carry, each layer writing its new slots in place; as a scanned input and output it
    # would be held twice.
    xs = (self.layers, rope.inv_freq, per_layer(positions), per_layer(segment_ids), per_layer(original),
          jnp.arange(c.num_layers))
    if c.scan_layers:
      (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    else:
      for i in range(c.num_layers):
        (x, cache), _ = body((x, cache), jax.tree.map(lambda a: a[i], xs))
    return rms_norm(x, self.final_norm, c.rms_norm_eps), cache


def _init_for(name):
  if name.endswith("norm"):
    return nn.initializers.ones
  return nn.initializers.zeros if name.endswith("bias") else nn.initializers.normal(0.02)


def _layers_init(shapes, dtype):
  def init(key):
    keys = jax.random.split(key, len(shapes))
    return {name: _init_for(name)(k, shape, dtype) for k, (name, shape) in zip(keys, shapes.items())}
  return init


def init_params(config: ModelConfig, key: jax.Array) -> dict:
  """Random parameters (normal(0.02) weights, unit norms), as a plain dict."""
  b, t = 1, 8
  tokens = jnp.zeros((b, t), jnp.int32)
  positions = jnp.zeros((b, t), jnp.int32)
  rope = jax.tree.map(jnp.asarray, config.rope_arrays())
  # Parameters do not depend on execution choices; a plain config lets init run outside any mesh (ring).
  plain = config.replace(attention="reference", remat="none")
  return jax.jit(lambda k: Llama(plain).init(k, tokens, positions, rope)["params"])(key)


def forward(config: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array,
            rope: rope_lib.RopeArrays, segment_ids: jax.Array | None = None,
            original: jax.Array | None = None) -> jax.Array:
  """Hidden states [b, t, D] after the final norm."""
  return Llama(config).apply({"params": params}, tokens, positions, rope, segment_ids=segment_ids,
                             original=original)[0]


def head_weights(config: ModelConfig, params: dict) -> jax.Array:
  """The vocab projection [D, V]."""
  return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits(config: ModelConfig, params: dict, tokens, positions, rope) -> jax.Array:
  """Full logits f32[b, t, V]; for tests and short decoding only (long inputs use lrjax.loss)."""
  hidden = forward(config, params, tokens, positions, rope)
  return jnp.einsum("btd,dv->btv", hidden, head_weights(config, params).astype(hidden.dtype),
                    preferred_element_type=jnp.float32)
