"""Fused attention for GPUs in Pallas (Triton), masking by position like the blockwise kernel.

jax.experimental.pallas.ops.gpu.attention.mha masks by index, takes one segment-id array for queries and keys,
repeats nothing for GQA only because it supports none, and its backward cannot take an external log-sum-exp.
These kernels keep its FlashAttention-2 structure and add what lrjax needs: causal / sliding-window / segment
masks from positions and segment ids (any order: zig-zag, KV caches), GQA by index maps (a query head reads
its key/value head; dk, dv sum the group in the kernel), lse out of the forward, and a backward from given
(out, lse) that adds into f32 accumulators in place (input_output_aliases). So it serves as plain attention
and as the ring step on GPUs.

Grids: forward and dq (q block, batch, q head), looping over key blocks; dk/dv (key block, batch, kv head),
looping over the g heads of the group and the query blocks. Every block pair is classified from its position
ranges (lrjax.kernels.mask.block_class): EMPTY pairs are skipped, FULL ones skip the mask.

On the CPU backend the kernels run in Pallas interpret mode (tests); `interpret=False` is the GPU build.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lrjax.kernels import mask as mask_lib
from lrjax.kernels import step as step_lib

MAX_BLOCK_FWD = (128, 64)  # (queries, keys) per tile: shared-memory and register budgets of one SM
MAX_BLOCK_BWD = (64, 64)


def _dot(a, b, trans_b=False):
  return pl.dot(a, b, trans_b=trans_b)  # f32 accumulation for every input dtype


def _ref(x):
  return None if x is None else x[...]


class _Rules:
  """Static mask rules of a kernel (a plain object closed over by the kernels)."""

  def __init__(self, causal, window):
    self.causal, self.window = causal, window

  def classify(self, q_pos, k_pos, q_seg, k_seg):
    return mask_lib.block_class(q_pos, k_pos, q_seg, k_seg, causal=self.causal, sliding_window=self.window)

  def logits(self, q, k, q_pos, k_pos, q_seg, k_seg, masked):
    logits = _dot(q, k, trans_b=True)
    if masked:
      vis = mask_lib.visible(q_pos, k_pos, q_seg, k_seg, causal=self.causal, sliding_window=self.window)
      logits = jnp.where(vis, logits, -jnp.inf)
    return logits


def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref, *, rules, scale, bk):
  q = q_ref[...] * jnp.asarray(scale, q_ref.dtype)  # [bq, h], scaled as in the backward
  q_pos, q_seg = qp_ref[...], _ref(qs_ref)

  def body(j, carry):
    keys = pl.ds(j * bk, bk)
    k_pos, k_seg = kp_ref[keys], None if ks_ref is None else ks_ref[keys]

    def compute(carry, masked):
      o, m, l = carry
      logits = rules.logits(q, k_ref[keys, :], q_pos, k_pos, q_seg, k_seg, masked)
      m_new = jnp.maximum(m, logits.max(-1))
      m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
      p = jnp.exp(logits - m_safe[:, None])
      alpha = jnp.exp(m - m_safe)
      v = v_ref[keys, :]
      return o * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new, alpha * l + p.sum(-1)

    branches = [lambda c: c, functools.partial(compute, masked=True), functools.partial(compute, masked=False)]
    return lax.switch(rules.classify(q_pos, k_pos, q_seg, k_seg), branches, carry)

  bq, h = q.shape
  init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  o, m, l = lax.fori_loop(0, k_ref.shape[0] // bk, body, init)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, acc_ref, dq_ref,
               *, rules, scale, bk):
  q = q_ref[...] * jnp.asarray(scale, q_ref.dtype)
  q_pos, q_seg, do, lse, delta = qp_ref[...], _ref(qs_ref), do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(j * bk, bk)
    k_pos, k_seg = kp_ref[keys], None if ks_ref is None else ks_ref[keys]

    def compute(dq, masked):
      k, v = k_ref[keys, :], v_ref[keys, :]
      p = jnp.exp(rules.logits(q, k, q_pos, k_pos, q_seg, k_seg, masked) - lse[:, None])
      ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
      return dq + _dot(ds.astype(k.dtype), k)

    branches = [lambda c: c, functools.partial(compute, masked=True), functools.partial(compute, masked=False)]
    return lax.switch(rules.classify(q_pos, k_pos, q_seg, k_seg), branches, dq)

  dq = lax.fori_loop(0, k_ref.shape[0] // bk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = acc_ref[...] + dq * scale


def _dkv_kernel(k_ref, v_ref, kp_ref, ks_ref, q_ref, qp_ref, qs_ref, do_ref, lse_ref, delta_ref, dk_acc_ref,
                dv_acc_ref, dk_ref, dv_ref, *, rules, scale, bq):
  """dk, dv of one key block of one kv head, summed over the g query heads of its group (refs [t, g, ...])."""
  k, v, k_pos, k_seg = k_ref[...], v_ref[...], kp_ref[...], _ref(ks_ref)
  g = q_ref.shape[1]

  def body(i, carry):
    rows = pl.ds(i * bq, bq)
    q_pos, q_seg = qp_ref[rows], None if qs_ref is None else qs_ref[rows]

    def compute(carry, masked):
      dk, dv = carry
      for head in range(g):  # static: the group's heads share this key block
        q = q_ref[rows, head, :] * jnp.asarray(scale, q_ref.dtype)
        do = do_ref[rows, head, :]
        p = jnp.exp(rules.logits(q, k, q_pos, k_pos, q_seg, k_seg, masked) - lse_ref[rows, head][:, None])
        dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows, head][:, None])
        dk = dk + pl.dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv

    branches = [lambda c: c, functools.partial(compute, masked=True), functools.partial(compute, masked=False)]
    return lax.switch(rules.classify(q_pos, k_pos, q_seg, k_seg), branches, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
  dk_ref[...] = dk_acc_ref[...] + dk
  dv_ref[...] = dv_acc_ref[...] + dv


def _call(kernel, *, grid, inputs, outputs, aliases=(), interpret, name):
  """pallas_call with optional inputs: `inputs` are (array or None, BlockSpec) pairs; absent ones reach the
  kernel as None refs. outputs: (ShapeDtypeStruct, BlockSpec) pairs; aliases: (input index, output index)."""
  present = [x is not None for x, _ in inputs]
  index = {i: sum(present[:i]) for i in range(len(inputs))}

  def wrapped(*refs):
    it = iter(refs[:sum(present)])
    kernel(*[next(it) if p else None for p in present], *refs[sum(present):])

  return pl.pallas_call(
      wrapped, grid=grid, name=name, interpret=interpret,
      in_specs=[spec for x, spec in inputs if x is not None], out_specs=[spec for _, spec in outputs],
      out_shape=[shape for shape, _ in outputs], input_output_aliases={index[i]: o for i, o in aliases},
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
  )(*[x for x, _ in inputs if x is not None])


def _rows(x, row_block, index):
  """BlockSpec of a per-token int array [b|1, L]: a batch of 1 is shared by every row of the grid."""
  if x is None:
    return None, None
  shared = x.shape[0] == 1
  return x, pl.BlockSpec((None, row_block), lambda *ids: ((0 if shared else index(*ids)[0]), index(*ids)[1]))


@dataclasses.dataclass(frozen=True)
class PallasGpu:
  """The Pallas-Triton kernels as a Step (lrjax.kernels.step); tiles are capped at MAX_BLOCK_FWD/_BWD."""

  causal: bool = True
  sliding_window: int | None = None
  block_q: int = 128
  block_k: int = 64
  scale: float | None = None
  interpret: bool | None = None  # None: interpret on the CPU backend (tests), compile for the GPU otherwise

  def tiles(self, t: int, s: int):
    """((fwd q, fwd k), (bwd q, bwd k)) tile sizes for lengths t, s."""
    (fq, fk), (bq, bk) = MAX_BLOCK_FWD, MAX_BLOCK_BWD
    return ((min(self.block_q, fq, t), min(self.block_k, fk, s)), (min(self.block_q, bq, t), min(self.block_k, bk, s)))

  def unsupported(self, q, k) -> str | None:
    """Why these shapes cannot run here (None: they can)."""
    (t, h), s = (q.shape[1], q.shape[3]), k.shape[1]
    if h < 16 or h & (h - 1):
      return f"head_dim {h} is not a power of two >= 16 (Triton tiles)"
    tiles = self.tiles(t, s)
    if any(t % bq or s % bk or bq & (bq - 1) or bk & (bk - 1) for bq, bk in tiles):
      return f"lengths (q {t}, k {s}) are not multiples of power-of-two tiles {tiles} (block_q/block_k)"
    return None

  def _setup(self, q, k):
    reason = self.unsupported(q, k)
    if reason:
      raise mask_lib.MaskError(f"pallas_gpu attention: {reason}")
    interpret = jax.default_backend() == "cpu" if self.interpret is None else self.interpret
    scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
    return _Rules(self.causal, self.sliding_window), scale, interpret

  def forward(self, q, k, v, q_pos, k_pos, q_segment, k_segment):
    mask_lib.check(q_pos, k_pos, q_segment, k_segment, causal=self.causal, sliding_window=self.sliding_window)
    rules, scale, interpret = self._setup(q, k)
    (b, t, n, h), (s, kh) = q.shape, k.shape[1:3]
    (bq, bk), _ = self.tiles(t, s)
    g = n // kh
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, h), lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0))
    at_q, at_k = (lambda i, bi, hi: (bi, i)), (lambda i, bi, hi: (bi, 0))
    inputs = [(q, q_spec), (k, kv_spec), (v, kv_spec), _rows(q_pos, bq, at_q), _rows(k_pos, s, at_k),
              _rows(q_segment, bq, at_q), _rows(k_segment, s, at_k)]
    outputs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec),
               (jax.ShapeDtypeStruct((b, t, n), jnp.float32),
                pl.BlockSpec((None, bq, None), lambda i, bi, hi: (bi, i, hi)))]
    kernel = functools.partial(_fwd_kernel, rules=rules, scale=scale, bk=bk)
    out, lse = _call(kernel, grid=(t // bq, b, n), inputs=inputs, outputs=outputs, interpret=interpret,
                     name="lrjax_attention_fwd")
    return out, lse

  def backward(self, q, k, v, q_pos, k_pos, q_segment, k_segment, out, lse, dout, dq, dk, dv):
    mask_lib.check(q_pos, k_pos, q_segment, k_segment, causal=self.causal, sliding_window=self.sliding_window)
    rules, scale, interpret = self._setup(q, k)
    (b, t, n, h), (s, kh) = q.shape, k.shape[1:3]
    _, (bq, bk) = self.tiles(t, s)
    g = n // kh
    dq, dk, dv = step_lib.zeros_like_grads(q, k, dq, dk, dv)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [b, t, n]
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that saw no key get p = 0

    # dq: grid (query block, batch, query head), looping over key blocks.
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, hi: (bi, i, hi, 0))
    row_spec = pl.BlockSpec((None, bq, None), lambda i, bi, hi: (bi, i, hi))
    kv_spec = pl.BlockSpec((None, s, None, h), lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0))
    at_q, at_k = (lambda i, bi, hi: (bi, i)), (lambda i, bi, hi: (bi, 0))
    inputs = [(q, q_spec), (k, kv_spec), (v, kv_spec), _rows(q_pos, bq, at_q), _rows(k_pos, s, at_k),
              _rows(q_segment, bq, at_q), _rows(k_segment, s, at_k), (dout, q_spec), (lse, row_spec),
              (delta, row_spec), (dq, q_spec)]
    dq, = _call(functools.partial(_dq_kernel, rules=rules, scale=scale, bk=bk), grid=(t // bq, b, n),
                inputs=inputs, outputs=[(jax.ShapeDtypeStruct(dq.shape, jnp.float32), q_spec)], aliases=[(10, 0)],
                interpret=interpret, name="lrjax_attention_dq")

    # dk, dv: grid (key block, batch, kv head), looping over the group's query heads and the query blocks.
    group = lambda x: x.reshape(b, t, kh, g, *x.shape[3:])
    k_spec = pl.BlockSpec((None, bk, None, h), lambda j, bi, hi: (bi, j, hi, 0))
    gq_spec = pl.BlockSpec((None, t, None, g, h), lambda j, bi, hi: (bi, 0, hi, 0, 0))
    g_spec = pl.BlockSpec((None, t, None, g), lambda j, bi, hi: (bi, 0, hi, 0))
    at_k, at_q = (lambda j, bi, hi: (bi, j)), (lambda j, bi, hi: (bi, 0))
    inputs = [(k, k_spec), (v, k_spec), _rows(k_pos, bk, at_k), _rows(k_segment, bk, at_k), (group(q), gq_spec),
              _rows(q_pos, t, at_q), _rows(q_segment, t, at_q), (group(dout), gq_spec), (group(lse), g_spec),
              (group(delta), g_spec), (dk, k_spec), (dv, k_spec)]
    out_k = (jax.ShapeDtypeStruct(dk.shape, jnp.float32), k_spec)
    dk, dv = _call(functools.partial(_dkv_kernel, rules=rules, scale=scale, bq=bq), grid=(s // bk, b, kh),
                   inputs=inputs, outputs=[out_k, out_k], aliases=[(10, 0), (11, 1)], interpret=interpret,
                   name="lrjax_attention_dkv")
    return dq, dk, dv
