"""jax.nn.dot_product_attention ("xla": materialised; "cudnn": cuDNN flash attention on NVIDIA GPUs).

Both mask by index: causal means key index <= query index, and `local_window_size=(w - 1, 0)` is lrjax's
sliding window w (the query and the w - 1 keys before it). That equals masking by position exactly when
lrjax.kernels.mask.index_aligned holds; the dispatch (lrjax.attention) checks it at run time and runs the
blockwise kernel otherwise. GQA: jax.nn.dot_product_attention takes fewer key/value heads (no repeat).
Segment ids: "xla" gets them as a dense [b, 1, t, s] mask (it materialises the logits anyway); the cuDNN path
takes none here (its packed-sequence form needs offsets and a static maximum segment count), so calls with
segment ids fall back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def unsupported(implementation: str, q, k, *, causal: bool, segments: bool) -> str | None:
  """Why `implementation` cannot run this call (None: it can); shapes and dtypes are static."""
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  if causal and t != s:
    return f"query and key lengths differ ({t} vs {s}, e.g. a KV cache): causal by index would be wrong"
  if implementation == "cudnn":
    if segments:
      return "the cuDNN path takes no segment ids"
    if q.dtype not in CUDNN_DTYPES:
      return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {q.dtype}"
    if h % 8 or h > 256:
      return f"cuDNN flash attention needs head_dim a multiple of 8 up to 256, got {h}"
  return None


def attention(q, k, v, *, implementation: str, causal: bool, scale: float | None = None,
              sliding_window: int | None = None, q_segment=None, k_segment=None):
  """jax.nn.dot_product_attention with lrjax's mask options mapped onto it (index semantics, see module doc).

  Args: q [b,t,n,h]; k, v [b,s,k,h]; segment ids i32[b|1,t] / [b|1,s] or None ("xla" only).
  Returns: [b,t,n,h] in q.dtype.
  """
  mask = None
  if q_segment is not None:
    mask = (q_segment[:, :, None] == k_segment[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=causal, implementation=implementation,
      local_window_size=None if sliding_window is None else (sliding_window - 1, 0))
