"""Ring attention on simulated devices against the dense reference; load balancing; model-level equality."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import attention as A
from lrjax import axes
from lrjax import loss as L
from lrjax import model as M
from lrjax import ring as R
from lrjax import rope as rope_lib
from lrjax import sharding as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(devices=None, **sizes):
  return S.make_mesh(sizes, devices=devices)


def _ring_mesh(n):
  return _mesh(devices=jax.devices()[:n], sequence=n)


def _unbalance(x, n, order):
  """Undo R.load_balance along axis 1 (the inverse permutation is the argsort of the permutation)."""
  return jax.tree.map(lambda a: a[:, np.argsort(R.permutation(a.shape[1], n, order))], x)


def _inputs(b, t, n, k, h, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, t, k, h)),
          jax.random.normal(ks[2], (b, t, k, h)), jax.random.normal(ks[3], (b, t, n, h)))


# ----------------------------------------------------------------------------------------------------------
# Load-balancing orders.


def test_zigzag_permutation_matches_hand_written_example():
  # 4 devices, 16 tokens, 8 chunks of 2: device i holds chunks i and 7 - i.
  np.testing.assert_array_equal(R.permutation(16, 4, "zigzag"),
                                [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
  np.testing.assert_array_equal(R.permutation(8, 2, "striped"), [0, 2, 4, 6, 1, 3, 5, 7])
  np.testing.assert_array_equal(R.permutation(8, 2, "none"), np.arange(8))


@pytest.mark.parametrize("order", axes.LOAD_BALANCE_ORDERS)
def test_load_balance_inverse_roundtrip(order):
  x = np.arange(3 * 24).reshape(3, 24)
  y = R.load_balance({"tokens": x, "pos": jnp.asarray(x)}, 4, order)
  assert isinstance(y["tokens"], np.ndarray) and isinstance(y["pos"], jax.Array)
  np.testing.assert_array_equal(_unbalance(y, 4, order)["tokens"], x)
  np.testing.assert_array_equal(np.asarray(_unbalance(y, 4, order)["pos"]), x)


def test_load_balance_errors():
  with pytest.raises(R.RingError, match="divisible by 2\\*ring = 8"):
    R.permutation(12, 4, "zigzag")
  with pytest.raises(R.RingError, match="unknown load-balancing order"):
    R.permutation(12, 4, "zig")


def test_zigzag_balances_causal_work():
  """Visible (query, key) pairs per device: equal under zig-zag, within t/n per device under striped,
  skewed 7x without balancing (device 0 sees 136 pairs of 16 tokens, device 3 sees 904)."""
  t, n = 64, 4
  work = {}
  for order in axes.LOAD_BALANCE_ORDERS:
    pos = R.permutation(t, n, order).reshape(n, t // n)
    work[order] = [int((pos[i][:, None] >= np.arange(t)[None]).sum()) for i in range(n)]
  assert work["none"] == [136, 392, 648, 904]
  assert len(set(work["zigzag"])) == 1 and sum(work["zigzag"]) == t * (t + 1) // 2
  assert max(work["striped"]) - min(work["striped"]) == (n - 1) * t // n


# ----------------------------------------------------------------------------------------------------------
# Ring attention == reference, values and gradients.

CASES = [  # (mesh sizes, causal, order, (q heads, kv heads))
    (dict(sequence=2), True, "none", (4, 2)),
    (dict(sequence=4), True, "zigzag", (4, 1)),
    (dict(sequence=8), True, "zigzag", (2, 2)),
    (dict(sequence=4), True, "striped", (4, 2)),
    (dict(sequence=4), False, "none", (4, 2)),
    (dict(data=2, sequence=2, tensor=2), True, "zigzag", (4, 2)),
]


@pytest.mark.parametrize("sizes, causal, order, heads", CASES)
def test_ring_matches_reference(sizes, causal, order, heads):
  devices = int(np.prod(list(sizes.values())))
  mesh = _mesh(devices=jax.devices()[:devices], **sizes)
  ring = sizes["sequence"]
  b, t, h = 2, 4 * ring, 8
  q, k, v, w = _inputs(b, t, heads[0], heads[1], h)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t)) + 3  # any global offset

  def ring_fn(q, k, v):
    ql, kl, vl, pl = R.load_balance((q, k, v, pos), ring, order)
    out = R.ring_attention_sharded(ql, kl, vl, pl, pl, causal=causal, block_q=2, block_k=2)
    return _unbalance(out, ring, order)

  ref_fn = lambda q, k, v: A.reference_attention(q, k, v, pos, pos, causal=causal)
  # One compile per function: the loss with the output as aux, differentiated in q, k, v.
  loss = lambda fn: jax.jit(jax.value_and_grad(lambda *a: (lambda o: (jnp.sum(jnp.sin(o) * w), o))(fn(*a)),
                                               argnums=(0, 1, 2), has_aux=True))
  with S.mesh_context(mesh):
    (_, out), grads = loss(ring_fn)(q, k, v)
  (_, out_ref), grads_ref = loss(ref_fn)(q, k, v)
  np.testing.assert_allclose(out, out_ref, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


def _documents(b, t, seed=0):
  """Packed documents: sorted segment ids per row."""
  return jnp.asarray(np.sort(np.random.RandomState(seed).randint(0, 3, (b, t)), axis=1), jnp.int32)


MASK_CASES = [  # (ring, order, (q heads, kv heads), sliding window, documents, dtype)
    (2, "zigzag", (4, 2), 5, True, jnp.float32),
    (4, "none", (4, 1), 6, False, jnp.float32),
    (4, "striped", (2, 2), None, True, jnp.float32),
    (8, "zigzag", (4, 2), 9, True, jnp.float32),
    (8, "striped", (4, 2), 4, False, jnp.float32),
    (4, "zigzag", (4, 2), 7, True, jnp.bfloat16),
]


def _ring_vs_reference(implementation, ring, order, heads, window, documents, dtype, t, h, block, atol):
  """The dispatch's ring on a load-balanced sequence, values and input gradients, against the reference."""
  mesh = _ring_mesh(ring)
  b = 2
  q, k, v, w = (x.astype(dtype) for x in _inputs(b, t, heads[0], heads[1], h))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t)) + 3
  seg = _documents(b, t) if documents else None

  def ring_fn(q, k, v):
    ql, kl, vl, pl, sl = R.load_balance((q, k, v, pos, seg), ring, order)
    out = A.attention(ql, kl, vl, pl, pl, implementation=implementation, block_q=block, block_k=block,
                      q_segment=sl, k_segment=sl, sliding_window=window)
    return _unbalance(out, ring, order)

  ref_fn = lambda q, k, v: A.reference_attention(q, k, v, pos, pos, q_segment=seg, k_segment=seg,
                                                 sliding_window=window)
  loss = lambda fn: jax.value_and_grad(
      lambda *a: (lambda o: (jnp.sum(jnp.sin(o.astype(jnp.float32)) * w), o))(fn(*a)), argnums=(0, 1, 2),
      has_aux=True)
  with S.mesh_context(mesh):
    (_, out), grads = jax.jit(loss(ring_fn))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  (_, out_ref), grads_ref = jax.jit(loss(ref_fn))(*f32)
  assert out.dtype == dtype
  np.testing.assert_allclose(out.astype(jnp.float32), out_ref, atol=atol)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g.astype(jnp.float32), g_ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("ring, order, heads, window, documents, dtype", MASK_CASES)
def test_ring_masks_match_reference(ring, order, heads, window, documents, dtype):
  """Sliding windows and document masks across ring steps (segment ids travel with their keys)."""
  atol = 3e-2 if dtype == jnp.bfloat16 else 1e-5
  _ring_vs_reference("ring:blockwise", ring, order, heads, window, documents, dtype, t=4 * ring, h=8, block=2,
                     atol=atol)


@pytest.mark.parametrize("step, t, h, block, window", [("pallas_gpu", 512, 32, 32, 40),
                                                       ("splash", 2048, 64, 128, None)])
def test_ring_fast_step_kernel_zigzag_8_devices(step, t, h, block, window):
  """The ring with a Pallas step kernel in interpret mode on 8 devices, zig-zag, documents (splash: every step's
  sub-block pairs are full, empty or causal, so no step leaves the kernel)."""
  _ring_vs_reference(f"ring:{step}", 8, "zigzag", (2, 1), window, True, jnp.float32, t=t, h=h, block=block,
                     atol=2e-5)


def test_ring_dispatch_resolves_and_falls_back(caplog):
  """"ring" resolves per backend (the CPU: blockwise steps); a fast step the local shapes do not fit logs once
  and runs blockwise steps (splash needs sub-blocks of whole 128-token tiles)."""
  assert A.resolve("ring", "cpu") == "ring:blockwise"
  with caplog.at_level("WARNING", logger="lrjax.attention"):
    _ring_vs_reference("ring:splash", 2, "zigzag", (2, 1), None, False, jnp.float32, t=24, h=8, block=4,
                       atol=1e-5)
  messages = [r.getMessage() for r in caplog.records if r.name == "lrjax.attention"]
  assert len(messages) == 1 and messages[0].startswith("ring step splash attention cannot run this call")


def _count_ppermutes(jaxpr, mult=1):
  """Executed ppermute operands (a scan body counts `length` times), per operand shape."""
  counts = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ppermute":
      for var in eqn.invars:
        counts[var.aval.shape] = counts.get(var.aval.shape, 0) + mult
    inner = mult * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else mult
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          for shape, c in _count_ppermutes(sub, inner).items():
            counts[shape] = counts.get(shape, 0) + c
  return counts


@pytest.mark.parametrize("passes", [1, 2])
def test_one_ppermute_per_rotated_tensor_per_step(passes):
  """Each of the `passes` rings sends every device's key slice (1/passes of its block) n times, the n-th hop
  bringing it home; the backward also sends each slice's dk/dv accumulator n times."""
  n, b, t, heads, kv, h = 4, 1, 16, 4, 2, 8
  mesh = _ring_mesh(n)
  q, k, v, _ = _inputs(b, t, heads, kv, h)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  f = lambda q, k, v: R.ring_attention_sharded(q, k, v, pos, pos, block_q=2, block_k=2, passes=passes)
  s = t // n // passes
  kv_shape, pos_shape, hops = (b, s, kv, h), (b, s), passes * n
  with S.mesh_context(mesh):
    fwd = _count_ppermutes(jax.make_jaxpr(f)(q, k, v).jaxpr)
    both = _count_ppermutes(jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v).jaxpr)
  assert fwd == {kv_shape: 2 * hops, pos_shape: hops}  # k and v (same shape), k positions
  # Forward again, then backward: k, v, positions; dk, dv.
  assert both == {kv_shape: 2 * hops * 2 + 2 * hops, pos_shape: 2 * hops}


def test_ring_passes_match_reference_and_bad_passes_fail():
  """Explicit passes (1, 4) on 8 devices, zig-zag, causal + documents + sliding window, values and grads vs the
  reference; passes that do not split the local keys into 2 x passes pieces raise RingError."""
  mesh = _ring_mesh(8)
  b, t, h = 2, 64, 8
  q, k, v, w = _inputs(b, t, 4, 2, h)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = _documents(b, t)

  def ring_fn(passes):
    def f(q, k, v):
      ql, kl, vl, pl, sl = R.load_balance((q, k, v, pos, seg), 8, "zigzag")
      out = R.ring_attention_sharded(ql, kl, vl, pl, pl, block_q=2, block_k=2, q_segment=sl, k_segment=sl,
                                     sliding_window=11, passes=passes)
      return _unbalance(out, 8, "zigzag")
    return f

  loss = lambda fn: jax.jit(jax.value_and_grad(lambda *a: (lambda o: (jnp.sum(jnp.sin(o) * w), o))(fn(*a)),
                                               argnums=(0, 1, 2), has_aux=True))
  ref = lambda q, k, v: A.reference_attention(q, k, v, pos, pos, q_segment=seg, k_segment=seg, sliding_window=11)
  (_, out_ref), grads_ref = loss(ref)(q, k, v)
  with S.mesh_context(mesh):
    for passes in (1, 4):
      (_, out), grads = loss(ring_fn(passes))(q, k, v)
      np.testing.assert_allclose(out, out_ref, atol=1e-5, err_msg=f"passes={passes}")
      for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, err_msg=f"passes={passes}")
    for passes in (3, 0):  # local keys: 8 tokens
      with pytest.raises(R.RingError, match=f"passes={passes}: the local key length 8 does not split"):
        R.ring_attention_sharded(q, k, v, pos, pos, passes=passes)


def test_ring_size_one_is_blockwise():
  mesh = _ring_mesh(1)
  q, k, v, _ = _inputs(1, 12, 2, 1, 8)
  pos = jnp.arange(12)[None]
  with S.mesh_context(mesh):
    out = jax.jit(lambda q, k, v: R.ring_attention_sharded(q, k, v, pos, pos, block_q=4, block_k=4))(q, k, v)
  np.testing.assert_allclose(out, A.reference_attention(q, k, v, pos, pos), atol=1e-5)


def test_ring_preconditions_fail_up_front():
  q, k, v, _ = _inputs(2, 12, 4, 2, 8)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  with pytest.raises(R.RingError, match="needs a mesh"):
    R.ring_attention_sharded(q, k, v, pos, pos)
  with S.mesh_context(_ring_mesh(8)):
    with pytest.raises(R.RingError, match="not divisible by ring axis 'sequence' of size 8"):
      R.ring_attention_sharded(q, k, v, pos, pos)
    with pytest.raises(R.RingError, match="ring axis 'context' is not in the mesh axes"):
      R.ring_attention_sharded(q, k, v, pos, pos, axis_name="context")
  with S.mesh_context(_mesh(devices=jax.devices()[:8], data=2, sequence=2, tensor=2)):
    q3, k3, v3, _ = _inputs(3, 12, 3, 3, 8)
    pos3 = jnp.broadcast_to(jnp.arange(12), (3, 12))
    with pytest.raises(R.RingError, match=r"batch 3 is not divisible.*heads \(q 3, kv 3\) are not divisible"):
      R.ring_attention_sharded(q3, k3, v3, pos3, pos3)


# ----------------------------------------------------------------------------------------------------------
# The model on a (data=2, sequence=4) mesh: perplexity and fine-tuning gradients equal single-device ones.

HALF = 4  # rotary_dim / 2 for head_dim 8
SCALING = rope_lib.RopeScaling(
    method="longrope", factor=4.0, original_max_position_embeddings=8,
    long_factor=(1.0, 1.7, 3.1, 5.3), short_factor=(1.0, 1.1, 1.3, 1.2), n_hat=5)
CFG = M.ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=32, rope_scaling=SCALING,
                    block_q=2, block_k=2)
B, T, RING = 2, 32, 4


def _nll(cfg, params, batch, rope):
  hidden = M.forward(cfg, params, batch["tokens"], batch["positions"], rope)
  nll, count = L.chunked_nll(hidden, M.head_weights(cfg, params), batch["targets"], batch["weights"], chunk=8)
  return nll.sum(), count.sum()


def _mean_nll(cfg):
  def f(params, batch, rope):
    nll, count = _nll(cfg, params, batch, rope)
    return nll / count, (nll, count)
  return f


@pytest.fixture(scope="module")
def model_setup():
  """Params, batch, LongRoPE arrays, and the single-device (mean NLL, (NLL sum, count)) and gradients."""
  params = M.init_params(CFG, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T + 1), 0, CFG.vocab_size)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
           "weights": jnp.ones((B, T)).at[:, :3].set(0.0)}
  rope = jax.tree.map(jnp.asarray, CFG.rope_arrays(seq_len=T))
  assert float(rope.mscale) != 1.0 and int(rope.n_hat) > 0  # long factors with a temperature and n̂ apply
  want = jax.jit(jax.value_and_grad(_mean_nll(CFG), has_aux=True))(params, batch, rope)
  return params, batch, rope, want


@pytest.fixture(scope="module")
def sp_mesh():
  mesh = _mesh(data=2, sequence=RING)
  S.validate(mesh, batch=B, length=T, config=CFG.replace(attention="ring"), order="zigzag")
  return mesh


def _shard(mesh, params, batch, order):
  batch = R.load_balance(batch, RING, order)
  return (jax.device_put(params, S.param_shardings(mesh, params)),
          jax.device_put(batch, S.batch_sharding(mesh)))


def test_model_perplexity_ring_equals_single_device(model_setup, sp_mesh):
  params, batch, rope, ((_, (want_nll, want_count)), _) = model_setup
  ring_cfg = CFG.replace(attention="ring")
  p_sh, b_sh = _shard(sp_mesh, params, batch, "zigzag")
  ring_nll = jax.jit(lambda p, b, r: _nll(ring_cfg, p, b, r))
  with S.mesh_context(sp_mesh):
    got_nll, got_count = ring_nll(p_sh, b_sh, rope)
    # Positions matter: the permuted tokens with contiguous positions give a different answer.
    wrong = dict(b_sh, positions=jax.device_put(batch["positions"], S.batch_sharding(sp_mesh)))
    bad_nll, _ = ring_nll(p_sh, wrong, rope)
  np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5)
  assert float(got_count) == float(want_count) == B * (T - 3)
  assert abs(float(bad_nll) - float(want_nll)) > 1e-3


def test_sequence_parallel_training_gradients_equal_single_device(model_setup, sp_mesh):
  params, batch, rope, ((want_loss, _), want) = model_setup
  ring_cfg = CFG.replace(attention="ring", remat="full")
  p_sh, b_sh = _shard(sp_mesh, params, batch, "zigzag")
  with S.mesh_context(sp_mesh):
    (loss, _), grads = jax.jit(jax.value_and_grad(_mean_nll(ring_cfg), has_aux=True))(p_sh, b_sh, rope)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  flat_want = dict((S.path_name(p), g) for p, g in jax.tree_util.tree_flatten_with_path(want)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = S.path_name(path)
    np.testing.assert_allclose(g, flat_want[name], atol=1e-6, rtol=1e-4, err_msg=name)


def test_model_mesh_that_does_not_fit_fails_up_front(sp_mesh):
  with pytest.raises(S.ShardingError, match="batch 3 is not divisible by data\\*fsdp = 2.*"
                                            "length 36 is not divisible by 2\\*sequence = 8"):
    S.validate(sp_mesh, batch=3, length=36, config=CFG.replace(attention="ring"), order="zigzag")


# ----------------------------------------------------------------------------------------------------------
# The GPU step benchmark keeps working (tiny sizes on CPU).


def test_gpu_step_benchmark_runs_tiny(tmp_path):
  """The tiny CPU mode runs every part (attention lengths x implementations, train step MFU, evaluation) and
  writes its markdown report."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  report = tmp_path / "gpu_step.md"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_step.py"), "--tiny", "--report",
                         str(report)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "FAILED" not in proc.stdout, proc.stdout[-3000:]
  text = report.read_text()
  for t in (128, 256):
    for impl in ("blockwise", "xla"):
      assert f"| attention t={t}: {impl}: TFLOP/s |" in text and f"| attention t={t}: {impl}: compiled memory |" in text
  assert "MFU of 989 TFLOP/s" in text and "| evaluation t=256 [auto: blockwise]: tokens/s |" in text
