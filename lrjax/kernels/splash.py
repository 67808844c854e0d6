"""TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) as a Step, exact for any positions.

Splash masks by index with static masks (full, causal, local window) and takes segment ids as data; GQA maps a
query head to its key/value head in the kernel. lrjax masks by position, so every call is cut into `parts` x
`parts` sub-blocks (queries x keys; squares of the shorter side when the lengths differ and it divides both)
and each pair is classified at run time from its positions:

  EMPTY    no pair visible                                   skipped
  FULL     every pair visible by position (segment ids still  splash, FullMask + segment ids
           applied by the kernel)
  DIAGONAL queries and keys carry the same positions,         splash, CausalMask (or LocalMask for a window)
           index-aligned (lrjax.kernels.mask.index_aligned)   + segment ids
  OTHER    anything else (permuted or partial windows)        the blockwise kernel on that sub-block

With contiguous positions (parts=1) a causal call is one DIAGONAL pair; with zig-zag load balancing (parts=2)
every ring step's sub-block pairs are EMPTY, FULL or DIAGONAL (also when the ring passes over half the keys at a
time: 4 x 2 squares), so the ring never leaves splash. Striped orders and KV caches whose lengths do not make
squares run as OTHER: correct, at blockwise speed.

The forward keeps splash's log-sum-exp (save_residuals) to merge sub-blocks and ring steps; the backward runs
splash's fused dq/dk/dv kernel from the given (global) out and lse. That entry point
(splash_attention_kernel._splash_attention_bwd) is private to jax; the interpret-mode tests pin its behaviour.
Splash gradients come out in the input dtype and are accumulated here in f32.

Why jax's splash and not tokamax's fork (MaxText's newer TPU default): it ships with the installed jax (no
extra pin, versioned together, testable here in interpret mode), while tokamax is a separate 0.0.x package.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from lrjax.kernels import blockwise
from lrjax.kernels import mask as mask_lib
from lrjax.kernels import step as step_lib

EMPTY, FULL, DIAGONAL, OTHER = 0, 1, 2, 3
LANES = 128  # splash tiles are multiples of the TPU lane width
_SAW_A_KEY = splash_lib.DEFAULT_MASK_VALUE / 2  # splash's lse for a row with no visible key is ~ mask value


@functools.lru_cache(maxsize=None)
def _kernel(kind: int, shape: tuple[int, int], heads: int, window: int | None, blocks: tuple[int, int],
            interpret: bool):
  """A splash kernel (save_residuals) for one static mask of `shape`, `heads` query heads."""
  if kind == FULL:
    mask = splash_masks.FullMask(shape)
  elif window is None:
    mask = splash_masks.CausalMask(shape)
  else:
    mask = splash_masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  bq, bkv = blocks
  sizes = splash_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
  with jax.ensure_compile_time_eval():  # concrete mask arrays, so the cached kernel outlives any one trace
    return splash_lib.make_splash_mha(splash_masks.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, save_residuals=True, interpret=interpret)


def _flat(info):
  """Mask info as the splash backward kernel wants it (partial mask blocks as one leading axis)."""
  if info is None or info.partial_mask_blocks is None:
    return info
  return info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(-1, *info.partial_mask_blocks.shape[-2:]))


def _segments(q_seg, k_seg):
  return None if q_seg is None else splash_lib.SegmentIds(q_seg, k_seg)


def _splash_forward(kernel, q, k, v, q_seg, k_seg):
  """Per batch row: q [n, t, h] (scaled), k, v [k, s, h] -> out [n, t, h], lse f32[n, t]."""
  out, (lse,) = kernel(q, k, v, _segments(q_seg, k_seg))
  saw = lse > _SAW_A_KEY
  return jnp.where(saw[..., None], out, 0).astype(q.dtype), jnp.where(saw, lse, -jnp.inf)


def _splash_backward(kernel, q, k, v, q_seg, k_seg, out, lse, dout):
  """Per batch row, from the given out [n, t, h] and lse [n, t]: (dq wrt the scaled q, dk, dv), input dtype."""
  kw = kernel.kwargs
  res = (q, k, v, _segments(q_seg, k_seg), None, out.astype(q.dtype), jnp.where(jnp.isfinite(lse), lse, jnp.inf),
         _flat(kernel.dq_mask_info), _flat(kernel.dkv_mask_info))
  grads = splash_lib._splash_attention_bwd(  # pylint: disable=protected-access
      False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], kw["residual_checkpoint_name"],
      kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"], res, dout.astype(q.dtype))
  return grads[3:6]


def _rows(seg, b: int):
  """Segment ids [1|b, c] as [b, c] (splash takes one row per batch element)."""
  return jnp.broadcast_to(seg, (b, seg.shape[1]))


def _heads_major(x):
  return jnp.swapaxes(x, 1, 2)  # [b, t, n, h] <-> [b, n, t, h]


@dataclasses.dataclass(frozen=True)
class Splash:
  """Splash attention as a Step (lrjax.kernels.step), `parts` x `parts` sub-blocks per call (see module doc)."""

  causal: bool = True
  sliding_window: int | None = None
  block_q: int = 512
  block_k: int = 512
  scale: float | None = None
  parts: int = 1
  interpret: bool | None = None  # None: interpret on the CPU backend (tests), compile for the TPU otherwise

  def sub_blocks(self, t: int, s: int) -> tuple[int, int]:
    """Sub-block lengths (queries, keys): t / parts and s / parts, or squares of the shorter of the two when it
    divides both. Squares keep a ring's key passes (lrjax.ring, passes=2: each half of the keys of a zig-zag
    step) index-aligned with the queries of their own chunk, so they stay DIAGONAL, FULL or EMPTY."""
    cq, ck = t // self.parts, s // self.parts
    side = min(cq, ck)
    return (side, side) if side and cq % side == 0 and ck % side == 0 else (cq, ck)

  def tiles(self, t: int, s: int):
    cq, ck = self.sub_blocks(t, s)
    return min(self.block_q, cq), min(self.block_k, ck)

  def unsupported(self, q, k) -> str | None:
    """Why these shapes cannot run here (None: they can)."""
    t, s = q.shape[1], k.shape[1]
    if t % self.parts or s % self.parts:
      return f"lengths (q {t}, k {s}) do not split into {self.parts} sub-blocks"
    (cq, ck), (bq, bk) = self.sub_blocks(t, s), self.tiles(t, s)
    if cq % bq or ck % bk or bq % LANES or bk % LANES:
      return (f"sub-block lengths (q {cq}, k {ck}) are not multiples of tiles ({bq}, {bk}) that are multiples of "
              f"{LANES} (block_q/block_k)")
    return None

  def _setup(self, q, k, q_pos, k_pos, q_segment, k_segment):
    mask_lib.check(q_pos, k_pos, q_segment, k_segment, causal=self.causal, sliding_window=self.sliding_window)
    reason = self.unsupported(q, k)
    if reason:
      raise mask_lib.MaskError(f"splash attention: {reason}")
    interpret = jax.default_backend() == "cpu" if self.interpret is None else self.interpret
    scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
    return scale, interpret

  def _fallback(self, scale):
    return blockwise.Blockwise(self.causal, self.sliding_window, self.block_q, self.block_k, scale)

  def _classify(self, q_pos, k_pos, q_seg, k_seg):
    rules = dict(causal=self.causal, sliding_window=self.sliding_window)
    visible = mask_lib.block_class(q_pos, k_pos, q_seg, k_seg, **rules)
    by_position = mask_lib.block_class(q_pos, k_pos, **rules)
    aligned = mask_lib.index_aligned(q_pos, k_pos, q_seg, k_seg)
    return jnp.where(visible == mask_lib.EMPTY, EMPTY, jnp.where(
        by_position == mask_lib.FULL, FULL, jnp.where(aligned & self.causal, DIAGONAL, OTHER)))

  def _pieces(self, q, k, v, q_pos, k_pos, q_segment, k_segment):
    """Sub-block slicers: (query slices, key slices), each a list of per-sub-block argument dicts."""
    cut = lambda x, i, c: None if x is None else lax.slice_in_dim(x, i * c, (i + 1) * c, axis=1)
    cq, ck = self.sub_blocks(q.shape[1], k.shape[1])
    qs = [dict(q=cut(q, i, cq), pos=cut(q_pos, i, cq), seg=cut(q_segment, i, cq)) for i in range(q.shape[1] // cq)]
    ks = [dict(k=cut(k, j, ck), v=cut(v, j, ck), pos=cut(k_pos, j, ck), seg=cut(k_segment, j, ck))
          for j in range(k.shape[1] // ck)]
    return qs, ks

  def _kernels(self, n, cq, ck, interpret):
    blocks = (min(self.block_q, cq), min(self.block_k, ck))
    return {kind: _kernel(kind, (cq, ck), n, self.sliding_window, blocks, interpret) for kind in (FULL, DIAGONAL)}

  def forward(self, q, k, v, q_pos, k_pos, q_segment, k_segment):
    scale, interpret = self._setup(q, k, q_pos, k_pos, q_segment, k_segment)
    qs, ks = self._pieces(q, k, v, q_pos, k_pos, q_segment, k_segment)
    kernels = self._kernels(q.shape[2], qs[0]["q"].shape[1], ks[0]["k"].shape[1], interpret)
    fallback = self._fallback(scale)
    outs, lses = [], []
    for qi in qs:
      q_heads = _heads_major(qi["q"] * jnp.asarray(scale, q.dtype))
      q_seg = None if qi["seg"] is None else _rows(qi["seg"], q.shape[0])
      acc = None
      for kj in ks:
        k_seg = None if kj["seg"] is None else _rows(kj["seg"], q.shape[0])

        def run(kind, qi=qi, kj=kj, q_heads=q_heads, q_seg=q_seg, k_seg=k_seg):
          fn = functools.partial(_splash_forward, kernels[kind])
          o, lse = jax.vmap(fn)(q_heads, _heads_major(kj["k"]), _heads_major(kj["v"]), q_seg, k_seg)
          return _heads_major(o), jnp.swapaxes(lse, 1, 2)

        def other(qi=qi, kj=kj):
          return fallback.forward(qi["q"], kj["k"], kj["v"], qi["pos"], kj["pos"], qi["seg"], kj["seg"])

        def empty(qi=qi):
          return jnp.zeros(qi["q"].shape, q.dtype), jnp.full(qi["q"].shape[:3], -jnp.inf, jnp.float32)

        branches = [empty, lambda: run(FULL), lambda: run(DIAGONAL), other]
        new = lax.switch(self._classify(qi["pos"], kj["pos"], qi["seg"], kj["seg"]), branches)
        acc = new if acc is None else step_lib.merge(acc, new)
      outs.append(acc[0].astype(q.dtype))
      lses.append(acc[1])
    return jnp.concatenate(outs, 1), jnp.concatenate(lses, 1)

  def backward(self, q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse, dout, dq, dk, dv):
    scale, interpret = self._setup(q, k, q_pos, k_pos, q_segment, k_segment)
    qs, ks = self._pieces(q, k, v, q_pos, k_pos, q_segment, k_segment)
    cq, ck = qs[0]["q"].shape[1], ks[0]["k"].shape[1]
    kernels = self._kernels(q.shape[2], cq, ck, interpret)
    fallback = self._fallback(scale)
    dq, dk, dv = step_lib.zeros_like_grads(q, k, dq, dk, dv)
    for i, qi in enumerate(qs):
      rows = lambda x, i=i: lax.slice_in_dim(x, i * cq, (i + 1) * cq, axis=1)
      out_i, lse_i, dout_i = rows(out), rows(lse), rows(dout)
      q_seg = None if qi["seg"] is None else _rows(qi["seg"], q.shape[0])
      for j, kj in enumerate(ks):
        k_seg = None if kj["seg"] is None else _rows(kj["seg"], q.shape[0])
        zeros = (jnp.zeros(qi["q"].shape, jnp.float32), jnp.zeros(kj["k"].shape, jnp.float32),
                 jnp.zeros(kj["k"].shape, jnp.float32))

        def run(kind, qi=qi, kj=kj, q_seg=q_seg, k_seg=k_seg, out_i=out_i, lse_i=lse_i, dout_i=dout_i):
          fn = functools.partial(_splash_backward, kernels[kind])
          g = jax.vmap(fn)(_heads_major(qi["q"] * jnp.asarray(scale, q.dtype)), _heads_major(kj["k"]),
                           _heads_major(kj["v"]), q_seg, k_seg, _heads_major(out_i), jnp.swapaxes(lse_i, 1, 2),
                           _heads_major(dout_i))
          g = [_heads_major(x).astype(jnp.float32) for x in g]
          return g[0] * scale, g[1], g[2]

        def other(qi=qi, kj=kj, out_i=out_i, lse_i=lse_i, dout_i=dout_i, zeros=zeros):
          return fallback.backward(qi["q"], kj["k"], kj["v"], qi["pos"], kj["pos"], qi["seg"], kj["seg"], out_i,
                                   lse_i, dout_i, *zeros)

        branches = [lambda zeros=zeros: zeros, lambda: run(FULL), lambda: run(DIAGONAL), other]
        g = lax.switch(self._classify(qi["pos"], kj["pos"], qi["seg"], kj["seg"]), branches)
        add = lambda acc, x, start, c: lax.dynamic_update_slice_in_dim(
            acc, lax.dynamic_slice_in_dim(acc, start, c, axis=1) + x, start, axis=1)
        dq, dk, dv = add(dq, g[0], i * cq, cq), add(dk, g[1], j * ck, ck), add(dv, g[2], j * ck, ck)
    return dq, dk, dv


