"""Rotary position embeddings and the whole RoPE-scaling family.

Two halves:

* Host side (numpy, float32 with the exact operation order of Hugging Face transformers): the inverse
  frequencies and attention factor of every scaling method, collected into a `RopeArrays` value.
* Device side (jax): `cos_sin` turns global positions into rotation tables in float32 by broadcast multiply,
  and `apply_rope` rotates q/k in the half-split ("rotate_half" / NeoX) layout that HF checkpoints use.

Everything that changes between two factor sets (inverse frequencies, n̂, attention temperature) lives in
`RopeArrays`, a pytree of arrays: jitted code takes it as a traced argument, so trying a new set never
recompiles. Which set applies to a sequence (the LongRoPE short/long switch) is decided here, on the host,
from the sequence length: one factor set per sequence, never one per chunk.

Notation: d = rotary dim, i = pair index 0..d/2-1, b = rope_theta, s = extension factor, L = original
(pre-training) context length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
TEMPERATURES = ("su", "yarn")
# Which extension ratio sets the LongRoPE attention temperature: the setting's target (transformers, Phi-3, the
# official main branch) or the length being processed (the paper's evaluation code: 1.0 within the window).
TEMPERATURE_FROM = ("target", "length")


class RopeError(ValueError):
  """A RoPE-scaling setting that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """One RoPE-scaling setting.

  Attributes:
    method: one of METHODS.
    factor: extension ratio s (target length / original length). Required by linear, ntk, dynamic, yarn and
      llama3. longrope may leave it None only until `resolve` fills it from a target length: arrays are never
      built from a longrope setting without s (its attention temperature depends on it).
    original_max_position_embeddings: L, the pre-training window (yarn, llama3, longrope and its temperature;
      dynamic NTK's reference length when set, else the model's max_position_embeddings as in transformers).
    beta_fast, beta_slow, truncate: YaRN ramp settings (rotations per L tokens).
    attention_factor: explicit attention factor (yarn, longrope); replaces the formula.
    mscale, mscale_all_dim: DeepSeek-style YaRN attention-factor rule.
    low_freq_factor, high_freq_factor: Llama 3 band edges.
    long_factor: LongRoPE rescale factors λ_i >= 1 (divide the frequency), shape [d/2] or [layers, d/2].
    short_factor: optional factors for sequences of at most L tokens (Phi-3 "longrope" switch).
    buckets: optional paper-style bucketed selection: ((max_len, factors), ...) sorted by max_len; the first
      bucket with seq_len <= max_len applies, long_factor beyond the last.
    n_hat: LongRoPE n̂: positions < n_hat keep the original angles and magnitude 1.
    temperature: longrope attention factor policy: "su" = sqrt(1 + ln s / ln L), "yarn" = 0.1 ln s + 1, or a
      constant number. Ignored when attention_factor is set.
    temperature_from: "target" (s of the setting, as transformers and Phi-3 apply it at every length) or
      "length" (s = max(1, length / L) of the sequence being processed, as the paper's evaluation code did);
      "length" uses the `temperature` policy, so it cannot be combined with an explicit attention_factor.
  """

  method: str = "default"
  factor: float | None = None
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  long_factor: tuple | None = None
  short_factor: tuple | None = None
  buckets: tuple = ()
  n_hat: int = 0
  temperature: str | float = "su"
  temperature_from: str = "target"

  def __post_init__(self):
    if self.method not in METHODS:
      raise RopeError(f"unknown rope method {self.method!r}; expected one of {', '.join(METHODS)}")
    for name in ("long_factor", "short_factor"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, _freeze(value))
    object.__setattr__(self, "buckets", tuple((int(n), _freeze(f)) for n, f in self.buckets))
    if self.method == "longrope":
      if self.long_factor is None:
        raise RopeError("longrope needs long_factor (one rescale factor per rotary frequency)")
      for name, value in self.factor_sets():
        arr = np.asarray(value, np.float64)
        if arr.ndim not in (1, 2):
          raise RopeError(f"{name} must have shape [d/2] or [layers, d/2], got {arr.shape}")
        if not np.all(np.isfinite(arr)):
          raise RopeError(f"{name} contains NaN or inf")
        if np.any(arr <= 0):
          raise RopeError(f"{name} must be positive, found {arr.min():g}")
      if self.n_hat < 0:
        raise RopeError(f"n_hat must be >= 0, got {self.n_hat}")
      if isinstance(self.temperature, str) and self.temperature not in TEMPERATURES:
        try:
          float(self.temperature)
        except ValueError:
          raise RopeError(f"unknown temperature policy {self.temperature!r}; expected 'su', 'yarn' or a "
                          "number") from None
      if self.temperature_from not in TEMPERATURE_FROM:
        raise RopeError(f"unknown temperature_from {self.temperature_from!r}; expected one of "
                        f"{', '.join(TEMPERATURE_FROM)}")
      if self.temperature_from == "length" and self.attention_factor is not None:
        raise RopeError("temperature_from='length' derives the temperature from each length with the "
                        "`temperature` policy; it cannot be combined with an explicit attention_factor")
    if self.method != "default" and self.factor is not None and (not math.isfinite(self.factor)
                                                                 or self.factor <= 0):
      raise RopeError(f"{self.method} needs a positive finite factor, got {self.factor}")
    if self.method not in ("default", "longrope") and self.factor is None:
      raise RopeError(f"{self.method} needs a factor (the extension ratio s)")
    if self.method in ("yarn", "llama3") and not self.original_max_position_embeddings:
      raise RopeError(f"{self.method} needs original_max_position_embeddings")

  def factor_sets(self):
    """(name, factors) of every factor set this setting carries."""
    sets = [("long_factor", self.long_factor)]
    if self.short_factor is not None:
      sets.append(("short_factor", self.short_factor))
    sets += [(f"buckets[{n}]", f) for n, f in self.buckets]
    return sets

  def replace(self, **kw) -> "RopeScaling":
    return dataclasses.replace(self, **kw)


def _freeze(value) -> tuple:
  arr = np.asarray(value, np.float64)
  return tuple(map(tuple, arr.tolist())) if arr.ndim == 2 else tuple(arr.tolist())


class RopeArrays(NamedTuple):
  """Everything the device needs to rotate q/k; a pytree of arrays (traced under jit).

  inv_freq: f32[layers, d/2], the scaled inverse frequencies (radians per position) per decoder layer.
  base_inv_freq: f32[d/2], the unscaled ones, used for positions < n_hat.
  mscale: f32[], magnitude of cos/sin for positions >= n_hat (the attention temperature; logits scale by its
    square).
  n_hat: i32[], number of initial positions kept un-interpolated at magnitude 1.
  """

  inv_freq: jax.Array | np.ndarray
  base_inv_freq: jax.Array | np.ndarray
  mscale: jax.Array | np.ndarray
  n_hat: jax.Array | np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Host side: inverse frequencies, float32, transformers' operation order.


def _pos_freqs(dim: int, theta: float) -> np.ndarray:
  """b^(2i/d) as float32: int arange -> f32 -> / d -> pow, as transformers does.

  The pow takes float32 operands but is evaluated in float64 and rounded once: numpy's float32 power is up to
  2 ulp off (13 of 64 entries for d=128, b=5e5), while torch's (and XLA's) is correctly rounded there, and an ulp
  of inv_freq is ~6e-4 rad of angle by position 5000.
  """
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)


def default_inv_freq(dim: int, theta: float) -> np.ndarray:
  """Plain RoPE inverse frequencies b^(-2i/d), f32[d/2]."""
  return (np.float32(1.0) / _pos_freqs(dim, theta)).astype(np.float32)


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(dim: int, theta: float, original_len: int, beta_fast: float, beta_slow: float,
                          truncate: bool = True) -> tuple[float, float]:
  """(low, high) pair indices of the YaRN ramp, clamped to [0, d-1]."""

  def correction_dim(rotations):
    return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n: int) -> np.ndarray:
  """clip((i - low) / (high - low), 0, 1) for i < n, float32."""
  if low == high:
    high += 0.001
  ramp = (np.arange(n, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
  return np.clip(ramp, 0, 1).astype(np.float32)


def policy_temperature(policy: str | float, scale: float, original_length: int) -> float:
  """The LongRoPE attention temperature (cos/sin magnitude) of a policy at extension ratio `scale`.

  "su": sqrt(1 + ln s / ln L) (1 for s <= 1); "yarn": 0.1 ln s + 1 (1 for s <= 1); a number: that constant.
  Logits scale by its square.
  """
  if policy == "su":
    return 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original_length))
  if policy == "yarn":
    return _get_mscale(scale)
  return float(policy)


def longrope_attention_factor(scaling: RopeScaling, seq_len: int | None = None) -> float:
  """The longrope temperature: explicit attention_factor, else the policy at the target's s, or at the processed
  length's s (max(1, seq_len / L)) when temperature_from == "length" and seq_len is given."""
  if scaling.attention_factor is not None:
    return float(scaling.attention_factor)
  original = _original(scaling)
  if scaling.temperature_from == "length" and seq_len is not None:
    return policy_temperature(scaling.temperature, max(1.0, seq_len / original), original)
  return policy_temperature(scaling.temperature, longrope_scale(scaling), original)


def longrope_scale(scaling: RopeScaling) -> float:
  """s of a longrope setting; an unresolved one (no factor) is an error naming what is missing."""
  if scaling.factor is None:
    raise RopeError("this longrope setting has no extension ratio s = target length / original window, which "
                    "sets its attention temperature; give the target length (a factor file's target_length, "
                    "a setting's ?target_length=, the stage or search length) or an explicit factor")
  return float(scaling.factor)


def _original(scaling: RopeScaling) -> int:
  if not scaling.original_max_position_embeddings:
    raise RopeError(f"this {scaling.method} setting has no original window (original_max_position_embeddings); "
                    "resolve it against the model (rope.resolve) first")
  return int(scaling.original_max_position_embeddings)


def resolve(scaling: RopeScaling, *, original_length: int, target_length: int | None = None) -> RopeScaling:
  """Makes a setting explicit against a model: the one rule every path (evaluate, search, train, convert,
  decode) uses.

  The setting's own values win; otherwise L = `original_length` (the model's original window) for the methods
  that read it, and for longrope s = target_length / L. A longrope setting whose s is still unknown while its
  temperature depends on it (no explicit attention_factor) is an error naming what is missing (it would
  otherwise run with s = 1 and no temperature).
  """
  if scaling.method in ("default", "linear", "ntk"):
    return scaling
  if not scaling.original_max_position_embeddings:
    scaling = scaling.replace(original_max_position_embeddings=int(original_length))
  if scaling.method == "longrope" and scaling.factor is None:
    if target_length:
      scaling = scaling.replace(factor=max(1.0, target_length / scaling.original_max_position_embeddings))
    elif scaling.attention_factor is None:  # s would set the temperature: it must be known
      longrope_scale(scaling)  # raises, naming what is missing
  return scaling


def select_longrope_factors(scaling: RopeScaling, seq_len: int | None):
  """The factor set that applies to a whole sequence of `seq_len` tokens (max position + 1).

  Phi-3/transformers switch: short_factor while seq_len <= L, long_factor beyond. Paper-style buckets, when
  given, take precedence: the first bucket whose max_len >= seq_len. seq_len None means "long" (the target).
  """
  if seq_len is not None:
    for max_len, factors in scaling.buckets:
      if seq_len <= max_len:
        return factors
    if scaling.short_factor is not None and seq_len <= _original(scaling):
      return scaling.short_factor
  return scaling.long_factor


def inv_freq_and_attention_factor(scaling: RopeScaling, *, dim: int, theta: float,
                                  max_position_embeddings: int | None = None,
                                  seq_len: int | None = None) -> tuple[np.ndarray, float]:
  """Inverse frequencies (f32[d/2] or f32[layers, d/2]) and attention factor of a setting.

  Args:
    scaling: the setting.
    dim: rotary dim d (head_dim * partial_rotary_factor).
    theta: rope_theta b.
    max_position_embeddings: the model config's value (dynamic NTK's L when the setting has no original).
    seq_len: length of the sequence being processed (max position + 1); used by dynamic NTK, the longrope
      short/long switch and temperature_from="length". None means "at initialisation" for dynamic and "long"
      (the target) for longrope.
  """
  m = scaling.method
  s = scaling.factor
  if m == "default":
    return default_inv_freq(dim, theta), 1.0
  if m == "linear":
    return (default_inv_freq(dim, theta) / np.float32(s)).astype(np.float32), 1.0
  if m == "ntk":
    return default_inv_freq(dim, theta * s ** (dim / (dim - 2))), 1.0
  if m == "dynamic":
    L = scaling.original_max_position_embeddings or max_position_embeddings
    if not L:
      raise RopeError("dynamic NTK needs its reference length (original_max_position_embeddings or the model's "
                      "max_position_embeddings)")
    seq = max(seq_len or L, L)
    base = theta * ((s * seq / L) - (s - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, base), 1.0
  if m == "yarn":
    L = scaling.original_max_position_embeddings
    pos_freqs = _pos_freqs(dim, theta)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(s) * pos_freqs)
    low, high = yarn_correction_range(dim, theta, L, scaling.beta_fast or 32, scaling.beta_slow or 1,
                                      scaling.truncate)
    extrapolation_factor = np.float32(1) - yarn_ramp(low, high, dim // 2)
    inv = interpolation * (np.float32(1) - extrapolation_factor) + extrapolation * extrapolation_factor
    if scaling.attention_factor is not None:
      attn = float(scaling.attention_factor)
    elif scaling.mscale and scaling.mscale_all_dim:
      attn = _get_mscale(s, scaling.mscale) / _get_mscale(s, scaling.mscale_all_dim)
    else:
      attn = _get_mscale(s)
    return inv.astype(np.float32), attn
  if m == "llama3":
    L = scaling.original_max_position_embeddings
    lf, hf = scaling.low_freq_factor, scaling.high_freq_factor
    inv = default_inv_freq(dim, theta)
    wavelen = np.float32(2 * math.pi) / inv
    low_wavelen, high_wavelen = L / lf, L / hf
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s), inv)
    smooth = (np.float32(L) / wavelen - np.float32(lf)) / np.float32(hf - lf)
    smoothed = (1 - smooth) * scaled / np.float32(s) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  # longrope
  factors = np.asarray(select_longrope_factors(scaling, seq_len), np.float32)
  if factors.shape[-1] != dim // 2:  # checked before the temperature: the clearer problem first
    raise RopeError(f"longrope factor count {factors.shape[-1]} != rotary_dim/2 = {dim // 2}")
  inv = np.float32(1.0) / (factors * _pos_freqs(dim, theta))
  return inv.astype(np.float32), longrope_attention_factor(scaling, seq_len)


def rope_arrays(scaling: RopeScaling, *, dim: int, theta: float, n_layers: int,
                max_position_embeddings: int | None = None, seq_len: int | None = None) -> RopeArrays:
  """Host-side RopeArrays for one sequence length (see inv_freq_and_attention_factor)."""
  inv, attn = inv_freq_and_attention_factor(scaling, dim=dim, theta=theta,
                                            max_position_embeddings=max_position_embeddings, seq_len=seq_len)
  if inv.ndim == 2 and inv.shape[0] != n_layers:
    raise RopeError(f"per-layer factors have {inv.shape[0]} rows but the model has {n_layers} layers")
  inv = np.broadcast_to(inv, (n_layers, dim // 2)).astype(np.float32)
  n_hat = scaling.n_hat if scaling.method == "longrope" else 0
  return RopeArrays(inv_freq=inv, base_inv_freq=default_inv_freq(dim, theta),
                    mscale=np.float32(attn), n_hat=np.int32(n_hat))


def stack_rope_arrays(items: Sequence[RopeArrays]) -> RopeArrays:
  """Stack per-candidate RopeArrays along a new leading axis (for population-parallel evaluation)."""
  return RopeArrays(*(np.stack([np.asarray(getattr(r, f)) for r in items]) for f in RopeArrays._fields))


# ----------------------------------------------------------------------------------------------------------
# Device side.


def cos_sin(positions: jax.Array, inv_freq: jax.Array, rope: RopeArrays,
            original: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Rotation tables for global positions.

  Args:
    positions: i32[b, t] global token positions.
    inv_freq: f32[d/2], this layer's scaled inverse frequencies.
    rope: supplies base_inv_freq, mscale and n_hat.
    original: optional bool[b, t]: tokens that keep the original RoPE (LongRoPE2's mixed context window: the
      short documents of a packed row), as positions < n̂ do.
  Returns:
    (cos, sin), each f32[b, t, d/2], already multiplied by the magnitude (1 for original tokens, else mscale).
  """
  # Broadcast multiply in float32: a dot here would run at reduced precision on TPU, and bf16 angles are
  # useless at long positions.
  pos = positions.astype(jnp.float32)[..., None]
  angle = pos * inv_freq.astype(jnp.float32)
  keep = positions < rope.n_hat
  if original is not None:
    keep = keep | original
  keep = keep[..., None]
  angle = jnp.where(keep, pos * rope.base_inv_freq.astype(jnp.float32), angle)
  magnitude = jnp.where(keep, jnp.float32(1), rope.mscale.astype(jnp.float32))
  return jnp.cos(angle) * magnitude, jnp.sin(angle) * magnitude


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x[b, t, n, h] in the half-split layout; dims beyond the rotary dim pass through.

  cos/sin: f32[b, t, d/2]; cast to x's dtype before the rotation, as transformers does.
  """
  half = cos.shape[-1]
  x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
  c = cos[:, :, None, :].astype(x.dtype)
  s = sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)
