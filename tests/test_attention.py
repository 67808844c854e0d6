"""Blockwise attention against the materialised reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import attention as A
from lrjax.kernels import mask as M


def _inputs(b=2, t=100, s=100, n=4, k=2, h=16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  kk = jax.random.normal(ks[1], (b, s, k, h))
  v = jax.random.normal(ks[2], (b, s, k, h))
  return q, kk, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("blocks", [(32, 16), (128, 128), (7, 9)])
def test_blockwise_matches_reference(causal, heads, blocks):
  q, k, v = _inputs(n=heads[0], k=heads[1])
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  fn_ref = lambda q, k, v: A.reference_attention(q, k, v, pos, pos, causal=causal)
  fn_blk = lambda q, k, v: A.blockwise_attention(q, k, v, pos, pos, causal, *blocks, None)
  loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
  out, g_blk = jax.jit(lambda *a: (fn_blk(*a), jax.grad(loss(fn_blk), argnums=(0, 1, 2))(*a)))(q, k, v)
  out_ref, g_ref = jax.jit(lambda *a: (fn_ref(*a), jax.grad(loss(fn_ref), argnums=(0, 1, 2))(*a)))(q, k, v)
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  for a, b in zip(g_blk, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_permuted_positions_mask_by_position_not_index():
  """A load-balanced order permutes tokens; masking by position must give the permuted reference output."""
  q, k, v = _inputs(b=1, t=64, s=64)
  pos = jnp.arange(64)[None]
  perm = jnp.asarray(np.random.RandomState(0).permutation(64))
  out = A.reference_attention(q, k, v, pos, pos)
  out_perm = A.blockwise_attention(q[:, perm], k[:, perm], v[:, perm], pos[:, perm], pos[:, perm], True, 16,
                                   16, None)
  np.testing.assert_allclose(out_perm, out[:, perm], atol=2e-6)


def test_lse_is_logsumexp_of_scaled_logits():
  q, k, v = _inputs(b=1, t=40, s=40, n=2, k=2)
  pos = jnp.arange(40)[None]
  _, lse = A.flash_forward(q, k, v, pos, pos, causal=True, block_q=16, block_k=8)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  logits = jnp.where(jnp.tril(jnp.ones((40, 40), bool)), logits, -jnp.inf)
  np.testing.assert_allclose(lse, jnp.moveaxis(jax.nn.logsumexp(logits, -1), 1, 2), rtol=1e-5)


def test_xla_dispatch_matches_reference():
  q, k, v = _inputs()
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  np.testing.assert_allclose(A.attention(q, k, v, pos, pos, implementation="xla"),
                             A.reference_attention(q, k, v, pos, pos), atol=2e-6)
  with pytest.raises(ValueError, match="unknown attention implementation"):
    A.attention(q, k, v, pos, pos, implementation="flash9")


# ----------------------------------------------------------------------------------------------------------
# Masks: segment ids (documents) and sliding windows, by position.


def _hand_mask(q_pos, k_pos, q_seg=None, k_seg=None, window=None, causal=True):
  """bool[b, t, s] by explicit loops over (query, key) pairs: the rules as stated, independent of the code."""
  b, t, s = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
  out = np.zeros((b, t, s), bool)
  for r in range(b):
    for i in range(t):
      for j in range(s):
        ok = (not causal) or k_pos[r, j] <= q_pos[r, i]
        if window is not None:
          ok = ok and k_pos[r, j] > q_pos[r, i] - window
        if q_seg is not None:
          ok = ok and q_seg[r, i] == k_seg[r, j]
        out[r, i, j] = ok
  return out


def _masked_softmax_attention(q, k, v, visible):
  """numpy float64 attention with an explicit [b, t, s] mask (rows with no key give 0)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(visible[:, None], logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  p = np.where(visible[:, None], np.exp(logits - np.where(np.isfinite(m), m, 0)), 0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _segments(b, t, n_docs, seed=0):
  """Sorted document ids per row (packed documents) and positions restarting at 0 in every document."""
  rs = np.random.RandomState(seed)
  seg = np.sort(rs.randint(0, n_docs, (b, t)), axis=1).astype(np.int32)
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    for i in range(1, t):
      pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
  return seg, pos


def test_sliding_window_follows_transformers_semantics():
  """Each query sees itself and the window - 1 keys before it: min(i + 1, w) keys at contiguous positions."""
  pos = np.arange(12)[None]
  visible = np.asarray(M.visible(pos, pos, causal=True, sliding_window=4))[0]
  np.testing.assert_array_equal(visible.sum(-1), np.minimum(np.arange(12) + 1, 4))
  np.testing.assert_array_equal(visible, _hand_mask(pos, pos, window=4)[0])
  assert visible[7, 4] and not visible[7, 3] and not visible[7, 8]


@pytest.mark.parametrize("mask", ["window", "segments", "window+segments", "segments noncausal"])
def test_reference_masks_match_hand_built_mask(mask):
  q, k, v = _inputs(b=2, t=24, s=24)
  seg, pos = _segments(2, 24, 3)
  window = 5 if "window" in mask else None
  causal = "noncausal" not in mask
  segs = (seg, seg) if "segments" in mask else (None, None)
  got = A.reference_attention(q, k, v, pos, pos, causal=causal, sliding_window=window, q_segment=segs[0],
                              k_segment=segs[1])
  want = _masked_softmax_attention(q, k, v, _hand_mask(pos, pos, *segs, window=window, causal=causal))
  np.testing.assert_allclose(got, want, atol=1e-5)


MASKS = {  # name: (causal, window, with segments)
    "window": (True, 9, False),
    "segments": (True, None, True),
    "window+segments": (True, 20, True),
    "segments noncausal": (False, None, True),
}


@pytest.mark.parametrize("mask, heads, head_loop", [
    ("window", (4, 2), True), ("window", (4, 1), False), ("segments", (4, 1), True), ("segments", (4, 2), False),
    ("window+segments", (4, 2), True), ("segments noncausal", (4, 1), False)])
def test_blockwise_masks_match_reference(mask, heads, head_loop):
  causal, window, with_segments = MASKS[mask]
  q, k, v = _inputs(n=heads[0], k=heads[1])
  seg, pos = _segments(2, 100, 4)
  segs = dict(q_segment=seg, k_segment=seg) if with_segments else {}
  fn_ref = lambda q, k, v: A.reference_attention(q, k, v, pos, pos, causal=causal, sliding_window=window, **segs)
  fn_blk = lambda q, k, v: A.blockwise_attention(q, k, v, pos, pos, causal, 32, 16, sliding_window=window,
                                                 head_loop=head_loop, **segs)
  loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
  both = lambda fn: jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), argnums=(0, 1, 2))(*a)))(q, k, v)
  (out, grads), (out_ref, grads_ref) = both(fn_blk), both(fn_ref)
  np.testing.assert_allclose(out, out_ref, atol=2e-6)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_blockwise_bf16_inputs_f32_softmax():
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(b=1, t=64, s=64, n=4, k=2, h=32))
  seg, pos = _segments(1, 64, 2)
  kw = dict(sliding_window=24, q_segment=seg, k_segment=seg)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  out = A.blockwise_attention(q, k, v, pos, pos, True, 16, 16, **kw)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), A.reference_attention(*f32, pos, pos, **kw), atol=2e-2)
  loss = lambda fn: (lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))
  g = grad(lambda *a: A.blockwise_attention(*a, pos, pos, True, 16, 16, **kw))(q, k, v)
  g_ref = grad(lambda *a: A.reference_attention(*a, pos, pos, **kw))(*f32)
  for a, b in zip(g, g_ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), b, atol=5e-2, rtol=5e-2)


def test_wholly_masked_blocks_are_never_read():
  """NaN keys/values in key blocks no query may see (beyond every window, or a document no query is in): a
  computed-then-masked block would turn p = 0 times NaN into NaN, so finite outputs and gradients prove the
  blocks were skipped, forward and backward. Values must equal the reference with those blocks zeroed."""
  t, block, window = 128, 16, 16
  q, k, v = _inputs(b=1, t=64, s=t, n=2, k=1, h=8)
  q_pos, k_pos = jnp.arange(64, 128)[None], jnp.arange(t)[None]
  hidden = (k_pos < 64 - window - block)[..., None, None]  # keys 0..31: two whole blocks beyond every window
  seg_q, seg_k = jnp.zeros((1, 64), jnp.int32), jnp.where(jnp.arange(t) >= 112, 1, 0)[None]
  hidden_doc = (seg_k == 1)[..., None, None] & (k_pos >= 112)[..., None, None]  # keys 112..127: document 1
  for kw, hide in ((dict(sliding_window=window), hidden), (dict(q_segment=seg_q, k_segment=seg_k), hidden_doc)):
    k_nan, v_nan = jnp.where(hide, jnp.nan, k), jnp.where(hide, jnp.nan, v)
    fn = lambda q, k, v: A.blockwise_attention(q, k, v, q_pos, k_pos, True, block, block, **kw)
    value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))
    out, grads = value_and_grad(fn)(q, k_nan, v_nan)
    ref = lambda q, k, v: A.reference_attention(q, k, v, q_pos, k_pos, **kw)
    want, want_grads = value_and_grad(ref)(q, jnp.where(hide, 0.0, k), jnp.where(hide, 0.0, v))
    np.testing.assert_allclose(out, want, rtol=1e-5)
    for g, w in zip(grads, want_grads):
      assert bool(jnp.all(jnp.isfinite(g)))
      np.testing.assert_allclose(g, w, atol=2e-5)


def test_sliding_window_skips_most_block_pairs():
  """The classifier the kernels share: with a window of 1/8 of the length, only pairs on and next to the
  diagonal remain (15 of 136 causal pairs for 16 blocks), hand-counted."""
  t, block = 256, 16
  pos = np.arange(t)
  classes = np.array([[int(M.block_class(pos[i:i + block], pos[j:j + block], causal=True,
                                                     sliding_window=t // 8))
                       for j in range(0, t, block)] for i in range(0, t, block)])
  causal = np.array([[int(M.block_class(pos[i:i + block], pos[j:j + block], causal=True))
                      for j in range(0, t, block)] for i in range(0, t, block)])
  assert (causal != M.EMPTY).sum() == 136 and (causal == M.PARTIAL).sum() == 16
  # Window 32 = 2 blocks: pair (i, j) is visible for i - j in {0, 1, 2} (16 + 15 + 14 = 45 pairs); i - j = 1
  # is wholly inside every window (q_hi - k_lo = 31 < 32), the diagonal and i - j = 2 are cut by an edge.
  assert (classes != M.EMPTY).sum() == 45
  assert (classes == M.FULL).sum() == 15 and (classes == M.PARTIAL).sum() == 30


def test_index_aligned_only_where_index_masks_equal_position_masks():
  ar = jnp.arange(8)[None]
  seg, restart = (jnp.asarray(x) for x in _segments(1, 8, 3, seed=1))
  zigzag = jnp.asarray([[0, 1, 6, 7, 2, 3, 4, 5]])
  aligned = lambda *a: bool(M.index_aligned(*a))
  assert aligned(ar, ar) and aligned(ar + 5, ar + 5)  # any offset
  assert aligned(restart, restart, seg, seg)  # documents packed with positions restarting per document
  assert not aligned(restart, restart)  # the same positions without segment ids: index masks would leak
  assert not aligned(zigzag, zigzag)  # a load-balanced order
  assert not aligned(ar, jnp.arange(12)[None])  # a KV cache (t != s)
  assert not aligned(ar, ar + 1)  # queries and keys at different positions
  reused = jnp.asarray([[0, 0, 1, 1, 0, 0, 2, 2]])  # a document id appearing twice, positions restarting
  assert not aligned(jnp.asarray([[0, 1, 0, 1, 0, 1, 0, 1]]), jnp.asarray([[0, 1, 0, 1, 0, 1, 0, 1]]), reused,
                     reused)


# ----------------------------------------------------------------------------------------------------------
# Dispatch.


def test_resolve_per_backend():
  assert [A.resolve("auto", b) for b in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "blockwise"]
  assert [A.resolve("ring", b) for b in ("tpu", "gpu", "cpu")] == ["ring:splash", "ring:pallas_gpu",
                                                                   "ring:blockwise"]
  assert A.resolve("ring:auto", "tpu") == "ring:splash" and A.resolve("pallas_gpu", "cpu") == "pallas_gpu"
  assert A.resolve("auto") == "blockwise"  # the test backend is the CPU
  with pytest.raises(A.AttentionError, match="unknown attention implementation 'ring:flash'"):
    A.resolve("ring:flash", "tpu")


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "xla", "auto"])
def test_dispatch_with_masks_matches_hand_built_mask(implementation):
  q, k, v = _inputs(b=2, t=40, s=40)
  seg, pos = _segments(2, 40, 3)
  got = A.attention(q, k, v, pos, pos, implementation=implementation, block_q=16, block_k=8, q_segment=seg,
                    k_segment=seg, sliding_window=6)
  want = _masked_softmax_attention(q, k, v, _hand_mask(pos, pos, seg, seg, window=6))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_index_masking_kernels_check_positions_at_run_time():
  """xla masks by index: for a permuted order (same jitted function, positions as data) the dispatch takes the
  blockwise path at run time, and the answer stays the by-position one."""
  q, k, v = _inputs(b=1, t=32, s=32)
  perm = jnp.asarray(np.random.RandomState(3).permutation(32))[None]
  fn = jax.jit(lambda q, k, v, pos: A.attention(q, k, v, pos, pos, implementation="xla", block_q=8, block_k=8))
  for pos in (jnp.arange(32)[None], perm):
    np.testing.assert_allclose(fn(q, k, v, pos), A.reference_attention(q, k, v, pos, pos), atol=2e-6)


def _record_dot_product_attention(monkeypatch):
  """Replace jax.nn.dot_product_attention by a recorder that runs the XLA implementation (no cuDNN on CPU)."""
  calls, real = [], jax.nn.dot_product_attention

  def fake(q, k, v, implementation=None, **kw):
    calls.append(dict(kw, implementation=implementation, q=q.shape, k=k.shape, v=v.shape))
    return real(q, k, v, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return calls


def test_cudnn_call_maps_arguments(monkeypatch):
  calls = _record_dot_product_attention(monkeypatch)
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(b=2, t=32, s=32, n=4, k=2, h=16))
  pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
  out = A.attention(q, k, v, pos, pos, implementation="cudnn", sliding_window=5)
  (call,) = [c for c in calls if c["implementation"] == "cudnn"]
  assert call["is_causal"] and call["local_window_size"] == (4, 0) and call["mask"] is None and call["scale"] is None
  assert call["k"] == (2, 32, 2, 16) and call["v"] == (2, 32, 2, 16)  # GQA: key/value heads not repeated
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  np.testing.assert_allclose(out.astype(jnp.float32), A.reference_attention(*f32, pos, pos, sliding_window=5),
                             atol=2e-2)


def test_unsupported_cases_fall_back_with_one_log_line(monkeypatch, caplog):
  calls = _record_dot_product_attention(monkeypatch)
  q, k, v = _inputs(b=1, t=24, s=24)
  seg, pos = _segments(1, 24, 2)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  with caplog.at_level("WARNING", logger="lrjax.attention"):
    for _ in range(2):
      out = A.attention(*bf, pos, pos, implementation="cudnn", q_segment=seg, k_segment=seg)
  assert not calls  # never reached cuDNN
  records = [r for r in caplog.records if r.name == "lrjax.attention"]
  assert len(records) == 1 and "cudnn attention cannot run this call (the cuDNN path takes no segment ids)" in (
      records[0].getMessage())
  f32 = [x.astype(jnp.float32) for x in bf]
  np.testing.assert_allclose(out.astype(jnp.float32),
                             A.reference_attention(*f32, pos, pos, q_segment=seg, k_segment=seg), atol=2e-2)
  caplog.clear()
  with caplog.at_level("WARNING", logger="lrjax.attention"):
    A.attention(q, k, v, pos, pos, implementation="cudnn")  # float32
    A.attention(q[:, :1], k, v, pos[:, :1], pos, implementation="splash")  # a KV cache step, 1 query
  messages = [r.getMessage() for r in caplog.records if r.name == "lrjax.attention"]
  assert any("needs bfloat16 or float16 inputs, got float32" in m for m in messages)
  assert any(m.startswith("splash attention cannot run this call") for m in messages) and len(messages) == 2


def test_mask_argument_errors():
  q, k, v = _inputs(b=1, t=8, s=8)
  pos = jnp.arange(8)[None]
  with pytest.raises(M.MaskError, match="sliding_window needs causal=True"):
    A.attention(q, k, v, pos, pos, causal=False, sliding_window=4)
  with pytest.raises(M.MaskError, match="q_segment and k_segment must be given together"):
    A.attention(q, k, v, pos, pos, q_segment=jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(M.MaskError, match="k_segment must be \\[b, 8\\]"):
    A.attention(q, k, v, pos, pos, q_segment=jnp.zeros((1, 8), jnp.int32), k_segment=jnp.zeros((1, 7), jnp.int32))
