"""Attention masks by position: the dense mask, a block classifier, and a test for index-masking kernels.

A query at position p sees a key at position r when every enabled rule allows it:
  causal          r <= p
  sliding window  r > p - window (with causal: the query and the window - 1 positions before it;
                  transformers' `sliding_window_causal` semantics, as in Mistral and Phi-3)
  segments        the query's and the key's segment ids are equal (documents packed into one row)
Rules compare positions and segment ids, never array indices, so permuted (load-balanced) orders and KV caches
mask correctly. Kernels that can only mask by index (splash, cuDNN) are valid exactly when
`index_aligned` holds, which they check at run time.
"""

from __future__ import annotations

import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2  # block classes: skip, apply the mask, no mask needed


class MaskError(ValueError):
  """Mask arguments that cannot work together; the message names the argument."""


def check(q_pos, k_pos, q_segment, k_segment, *, causal: bool, sliding_window: int | None) -> None:
  """Validate mask arguments (shapes are static, so this runs at trace time).

  Args: q_pos i32[b|1, t], k_pos i32[b|1, s]; q_segment i32[b|1, t] and k_segment i32[b|1, s], both or
    neither; sliding_window a positive int (needs causal) or None.
  Raises:
    MaskError naming the bad argument.
  """
  if sliding_window is not None:
    if not isinstance(sliding_window, int) or sliding_window < 1:
      raise MaskError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if not causal:
      raise MaskError("sliding_window needs causal=True (a window of past positions)")
  if (q_segment is None) != (k_segment is None):
    raise MaskError("q_segment and k_segment must be given together (or neither)")
  for name, seg, pos in (("q_segment", q_segment, q_pos), ("k_segment", k_segment, k_pos)):
    if seg is not None and (seg.ndim != 2 or seg.shape[1] != pos.shape[1]):
      raise MaskError(f"{name} must be [b, {pos.shape[1]}] like its positions, got {seg.shape}")


def visible(q_pos, k_pos, q_segment=None, k_segment=None, *, causal: bool,
            sliding_window: int | None = None):
  """bool[..., t, s]: which keys each query may see, from [..., t] and [..., s] (leading dims broadcast)."""
  qp, kp = q_pos[..., :, None], k_pos[..., None, :]
  mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
  if causal:
    mask = qp >= kp
  if sliding_window is not None:
    mask = mask & (kp > qp - sliding_window)
  if q_segment is not None:
    mask = mask & (q_segment[..., :, None] == k_segment[..., None, :])
  return mask


def block_class(q_pos, k_pos, q_segment=None, k_segment=None, *, causal: bool,
                sliding_window: int | None = None, k_count=None):
  """EMPTY, PARTIAL or FULL (i32 scalar) for a block pair, from the ranges of its positions and segment ids.

  Conservative: EMPTY only when no pair is visible and FULL only when every pair is, over all leading dims.
  Args: positions and segments of the block pair, any shapes (reduced whole); k_count: how many of the keys are
    real (the rest padding), None when all are.
  """
  q_lo, q_hi, k_lo, k_hi = jnp.min(q_pos), jnp.max(q_pos), jnp.min(k_pos), jnp.max(k_pos)
  empty, full = jnp.bool_(False), jnp.bool_(True)
  if causal:
    empty, full = empty | (q_hi < k_lo), full & (q_lo >= k_hi)
  if sliding_window is not None:
    empty, full = empty | (q_lo - k_hi >= sliding_window), full & (q_hi - k_lo < sliding_window)
  if q_segment is not None:
    qs_lo, qs_hi, ks_lo, ks_hi = jnp.min(q_segment), jnp.max(q_segment), jnp.min(k_segment), jnp.max(k_segment)
    empty = empty | (qs_hi < ks_lo) | (ks_hi < qs_lo)
    full = full & (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
  if k_count is not None:
    empty, full = empty | (k_count == 0), full & (k_count == k_pos.shape[-1])
  return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def index_aligned(q_pos, k_pos, q_segment=None, k_segment=None):
  """bool scalar: whether masking by index (query i vs key j) equals masking by position here.

  True when queries and keys carry the same positions (and segment ids) and, wherever a query and a key share a
  segment, position differences equal index differences: positions step by +1 along the whole row, or within
  each segment when the segments are contiguous runs in increasing order (documents packed with positions
  restarting per document). Zig-zag or striped orders, KV caches and padding with repeated positions are not.
  Args: q_pos [b|1, t], k_pos [b|1, s], segments i32[b|1, t] / [b|1, s] or None.
  """
  if q_pos.shape[-1] != k_pos.shape[-1]:
    return jnp.bool_(False)
  t = q_pos.shape[-1]
  ok = jnp.all(q_pos == k_pos)
  offset = q_pos - jnp.arange(t, dtype=q_pos.dtype)  # constant where index and position differences agree
  whole_rows = jnp.all(offset == offset[:, :1])
  if q_segment is None:
    return ok & whole_rows
  seg = q_segment
  runs = (jnp.all((seg[:, 1:] != seg[:, :-1]) | (offset[:, 1:] == offset[:, :-1]))
          & jnp.all(seg[:, 1:] >= seg[:, :-1]))
  return ok & jnp.all(q_segment == k_segment) & (whole_rows | runs)

