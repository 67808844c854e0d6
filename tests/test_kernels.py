"""Accelerator kernels on the CPU: Pallas interpret mode against the reference, lowering for TPU and GPU,
the backward's accumulators, and the dispatch of the fast paths under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import attention as A
from lrjax import sharding as S
from lrjax.kernels import blockwise
from lrjax.kernels import mask as M
from lrjax.kernels import pallas_gpu
from lrjax.kernels import splash
from lrjax.kernels import step


def _inputs(b, t, s, n, k, h, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(ks[0], (b, t, n, h)).astype(dtype), jax.random.normal(ks[1], (b, s, k, h)).astype(dtype),
          jax.random.normal(ks[2], (b, s, k, h)).astype(dtype), jax.random.normal(ks[3], (b, t, n, h)))


def _documents(b, t, seed=0):
  """Packed documents: sorted segment ids, positions restarting at 0 in each document."""
  seg = np.sort(np.random.RandomState(seed).randint(0, 3, (b, t)), axis=1).astype(np.int32)
  starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  idx = np.broadcast_to(np.arange(t), (b, t))
  pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return jnp.asarray(seg), jnp.asarray(pos, jnp.int32)


def _check(kernel, q, k, v, w, q_pos, k_pos, q_seg=None, k_seg=None, *, causal=True, window=None, atol=2e-5):
  """The kernel as attention (one jit: values and input gradients) against the f32 reference."""
  def loss(fn):
    return lambda q, k, v: (lambda o: (jnp.sum(jnp.sin(o.astype(jnp.float32)) * w), o))(fn(q, k, v))

  fast = lambda q, k, v: step.fused(kernel, q, k, v, q_pos, k_pos, q_seg, k_seg)
  ref = lambda q, k, v: A.reference_attention(q, k, v, q_pos, k_pos, causal=causal, sliding_window=window,
                                              q_segment=q_seg, k_segment=k_seg)
  (_, out), grads = jax.jit(jax.value_and_grad(loss(fast), argnums=(0, 1, 2), has_aux=True))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  (_, out_ref), grads_ref = jax.jit(jax.value_and_grad(loss(ref), argnums=(0, 1, 2), has_aux=True))(*f32)
  assert out.dtype == q.dtype
  np.testing.assert_allclose(out.astype(jnp.float32), out_ref, atol=atol)
  for g, g_ref in zip(grads, grads_ref):
    assert g.dtype == q.dtype
    np.testing.assert_allclose(g.astype(jnp.float32), g_ref, atol=atol * 2, rtol=atol * 2)


CASES = {  # name: (causal, window, documents, (q heads, kv heads), dtype)
    "causal": (True, None, False, (4, 4), jnp.float32),
    "documents": (True, None, True, (4, 2), jnp.float32),
    "window": (True, 40, False, (4, 1), jnp.float32),
    "gqa bf16 window documents": (True, 16, True, (4, 2), jnp.bfloat16),
    "bidirectional documents": (False, None, True, (2, 1), jnp.float32),
}


def _case(name, b, t, h):
  causal, window, documents, (n, kv), dtype = CASES[name]
  q, k, v, w = _inputs(b, t, t, n, kv, h, dtype)
  if documents:
    seg, pos = _documents(b, t)
  else:
    seg, pos = None, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  atol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
  return dict(causal=causal, window=window, atol=atol), (q, k, v, w, pos, pos, seg, seg)


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_gpu_interpret_matches_reference(name):
  kw, args = _case(name, 1, 128, 32)
  kernel = pallas_gpu.PallasGpu(kw["causal"], kw["window"], block_q=32, block_k=32)
  _check(kernel, *args, **kw)


def test_pallas_gpu_masks_by_position():
  """Permuted positions (a load-balanced order) and a KV cache (queries at the end of a longer key range)."""
  q, k, v, w = _inputs(1, 64, 128, 2, 1, 16)
  perm = jnp.asarray(np.random.RandomState(1).permutation(128), jnp.int32)[None]
  kernel = pallas_gpu.PallasGpu(True, None, block_q=32, block_k=32)
  _check(kernel, q, k, v, w, perm[:, :64], perm)
  _check(kernel, q, k, v, w, jnp.arange(64, 128, dtype=jnp.int32)[None], jnp.arange(128, dtype=jnp.int32)[None])


@pytest.mark.parametrize("name", list(CASES))
def test_splash_interpret_matches_reference(name):
  kw, args = _case(name, 1, 256, 64)
  _check(splash.Splash(kw["causal"], kw["window"], block_q=128, block_k=128), *args, **kw)


def test_splash_zigzag_ring_steps_stay_in_splash():
  """With zig-zag load balancing, every sub-block pair of every ring step is EMPTY, FULL or DIAGONAL (never
  the blockwise fallback), and the kernel on such a step (diagonal and off-diagonal) equals the reference."""
  ring, t = 4, 1024
  chunk = t // (2 * ring)
  local = [np.concatenate([np.arange(i * chunk, (i + 1) * chunk), np.arange((2 * ring - 1 - i) * chunk,
                                                                           (2 * ring - i) * chunk)])
           for i in range(ring)]
  kernel = splash.Splash(True, None, block_q=128, block_k=128, parts=2)
  classify = jax.jit(lambda q_pos, k_pos: kernel._classify(q_pos, k_pos, None, None))
  for qi in range(ring):
    for ki in range(ring):
      q_pos, k_pos = (jnp.asarray(local[i], jnp.int32)[None] for i in (qi, ki))
      classes = [int(classify(q_pos[:, a * chunk:(a + 1) * chunk], k_pos[:, c * chunk:(c + 1) * chunk]))
                 for a in range(2) for c in range(2)]
      assert splash.OTHER not in classes, (qi, ki, classes)
  q, k, v, w = _inputs(1, 2 * chunk, 2 * chunk, 2, 1, 64)
  for qi, ki in ((1, 1), (1, 2)):
    _check(kernel, q, k, v, w, *(jnp.asarray(local[i], jnp.int32)[None] for i in (qi, ki)))


def test_splash_zigzag_half_key_passes_stay_in_splash():
  """The ring's key passes (lrjax.ring, passes=2: each half of a zig-zag block's keys, so [b, c] keys against
  [b, 2c] queries): the kernel cuts squares of c/2, and every pair of every step of both passes is EMPTY, FULL or
  DIAGONAL; a diagonal and an off-diagonal step equal the reference."""
  ring, t, passes = 4, 2048, 2
  chunk = t // (2 * ring)
  local = [np.concatenate([np.arange(i * chunk, (i + 1) * chunk), np.arange((2 * ring - 1 - i) * chunk,
                                                                           (2 * ring - i) * chunk)])
           for i in range(ring)]
  key_slice = lambda i, p: local[i].reshape(2, passes, chunk // passes)[:, p].reshape(-1)
  kernel = splash.Splash(True, None, block_q=128, block_k=128, parts=2)
  assert kernel.sub_blocks(2 * chunk, chunk) == (128, 128)
  classify = jax.jit(lambda q_pos, k_pos: kernel._classify(q_pos, k_pos, None, None))
  side = 128
  for qi in range(ring):
    for ki in range(ring):
      for p in range(passes):
        q_pos, k_pos = jnp.asarray(local[qi], jnp.int32)[None], jnp.asarray(key_slice(ki, p), jnp.int32)[None]
        classes = [int(classify(q_pos[:, a * side:(a + 1) * side], k_pos[:, c * side:(c + 1) * side]))
                   for a in range(2 * chunk // side) for c in range(chunk // side)]
        assert splash.OTHER not in classes, (qi, ki, p, classes)
  q, k, v, w = _inputs(1, 2 * chunk, chunk, 2, 1, 64)
  for qi, ki, p in ((1, 1, 0), (1, 0, 1)):  # every query row sees a key in both
    _check(kernel, q, k, v, w, jnp.asarray(local[qi], jnp.int32)[None], jnp.asarray(key_slice(ki, p), jnp.int32)[None])


def test_splash_permuted_positions_stay_exact():
  """Positions splash cannot mask by index (a random order) run the blockwise path at run time: still exact."""
  q, k, v, w = _inputs(1, 256, 256, 2, 1, 64)
  perm = jnp.asarray(np.random.RandomState(2).permutation(256), jnp.int32)[None]
  kernel = splash.Splash(True, None, block_q=128, block_k=128)
  assert int(kernel._classify(perm, perm, None, None)) == splash.OTHER
  _check(kernel, q, k, v, w, perm, perm)


def _block_share_reference(q, k, v, kb, vb, q_pos, pos, block_pos, window, dout):
  """Gradients of the keys kb, vb (appended to k, v) and their share of dq, by materialised f32 softmax: the other
  keys' logits see q only through stop_gradient, so dq holds exactly this block's part."""
  g = q.shape[2] // k.shape[2]
  rep = lambda x: jnp.repeat(x, g, axis=2)

  def out(q, kb, vb):
    logits = jnp.concatenate([jnp.einsum("btnh,bsnh->bnts", jax.lax.stop_gradient(q), rep(k)),
                              jnp.einsum("btnh,bsnh->bnts", q, rep(kb))], -1) * q.shape[-1] ** -0.5
    keys = jnp.concatenate([pos, block_pos], 1)
    visible = M.visible(q_pos, keys, causal=True, sliding_window=window)
    p = jax.nn.softmax(jnp.where(visible[:, None], logits, -jnp.inf), -1)
    return jnp.einsum("bnts,bsnh->btnh", p, rep(jnp.concatenate([v, vb], 1)))

  return jax.vjp(out, q, kb, vb)[1](dout)


@pytest.mark.parametrize("kernel", [blockwise.Blockwise(True, 24, 32, 32), pallas_gpu.PallasGpu(True, 24, 32, 32),
                                    splash.Splash(True, 24, 128, 128)], ids=lambda k: type(k).__name__)
def test_backward_adds_into_given_accumulators(kernel):
  """For a key block of a larger softmax (the ring's case): backward(dq, dk, dv) = the given accumulators + this
  block's gradients, from the global (out, lse)."""
  h = 64 if isinstance(kernel, splash.Splash) else 16
  q, k, v, dout = _inputs(1, 128, 256, 2, 1, h)
  pos = jnp.arange(256, dtype=jnp.int32)[None]
  q_pos, first, second = pos[:, 128:], slice(0, 128), slice(128, 256)
  out, lse = blockwise.flash_forward(q, k, v, q_pos, pos, block_q=32, block_k=32, sliding_window=24)
  kb, vb = k[:, second], v[:, second]
  acc = [jax.random.normal(jax.random.PRNGKey(i), x.shape) for i, x in enumerate((q, kb, vb))]
  args = (q, kb, vb, q_pos, pos[:, second], None, None, out, lse, dout)
  got = jax.jit(lambda *acc: kernel.backward(*args, *acc))(*acc)
  want = jax.jit(_block_share_reference, static_argnums=8)(q, k[:, first], v[:, first], kb, vb, q_pos, pos[:, first],
                                                          pos[:, second], 24, dout)
  for g, a, w in zip(got, acc, want):
    np.testing.assert_allclose(g, a + w, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# The kernels build for their accelerators (lowering on the CPU; no device needed).


def test_pallas_gpu_lowers_to_triton():
  q, k, v, _ = _inputs(2, 256, 256, 8, 2, 64, jnp.bfloat16)
  pos = jnp.zeros((2, 256), jnp.int32)
  kernel = pallas_gpu.PallasGpu(True, 64, interpret=False)
  grad = jax.grad(lambda q, k, v: step.fused(kernel, q, k, v, pos, pos, pos, pos).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2))
  text = jax.jit(grad).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_splash_lowers_to_mosaic():
  q, k, v, _ = _inputs(1, 512, 512, 4, 2, 128, jnp.bfloat16)
  pos = jnp.zeros((1, 512), jnp.int32)
  kernel = splash.Splash(True, 64, block_q=128, block_k=128, parts=2, interpret=False)
  grad = jax.grad(lambda q, k, v: step.fused(kernel, q, k, v, pos, pos, pos, pos).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2))
  assert "tpu_custom_call" in jax.jit(grad).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()


# ----------------------------------------------------------------------------------------------------------
# Dispatch of the fast paths.


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
def test_fast_paths_run_per_device_under_a_mesh(implementation):
  """Under a (data=2, tensor=2) mesh the Pallas kernels run in a shard_map over batch rows and heads."""
  mesh = S.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
  q, k, v, _ = _inputs(2, 256, 256, 4, 2, 64)
  seg, pos = _documents(2, 256)
  fn = jax.jit(lambda q, k, v: A.attention(q, k, v, pos, pos, implementation=implementation, block_q=128,
                                           block_k=128, q_segment=seg, k_segment=seg, sliding_window=100))
  with S.mesh_context(mesh):
    text = fn.lower(q, k, v).as_text()
    out = fn(q, k, v)
  assert "shard_map" in text or "sdy.manual_computation" in text
  want = A.reference_attention(q, k, v, pos, pos, q_segment=seg, k_segment=seg, sliding_window=100)
  np.testing.assert_allclose(out, want, atol=2e-5)


def test_interpret_mode_only_on_the_cpu(monkeypatch):
  """interpret=None follows the backend: interpret on the CPU, compile on an accelerator."""
  seen = []
  real = pallas_gpu.pl.pallas_call
  monkeypatch.setattr(pallas_gpu.pl, "pallas_call", lambda *a, **kw: seen.append(kw["interpret"]) or real(*a, **kw))
  q, k, v, _ = _inputs(1, 32, 32, 2, 1, 16)
  pos = jnp.arange(32, dtype=jnp.int32)[None]
  pallas_gpu.PallasGpu(block_q=16, block_k=16).forward(q, k, v, pos, pos, None, None)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  jax.jit(lambda q, k, v: pallas_gpu.PallasGpu(block_q=16, block_k=16, interpret=None).forward(
      q, k, v, pos, pos, None, None)).trace(q, k, v)
  assert seen == [True, False]
