"""lrjax's ring attention against the `ringattention` package's pure-JAX ring, side by side on simulated devices.

  python benchmarks/ring_vs_peer.py                # 32k tokens on 8 simulated CPU devices, 3 interleaved runs
  python benchmarks/ring_vs_peer.py --documents    # packed documents (segment ids) for both
  python benchmarks/ring_vs_peer.py --quick        # smoke run: 4096 tokens, one run

The peer is ringattention 0.1.2 (haoliuhl/ringattention, the reference JAX ring), installed without its
dependencies: `pip install --no-deps ringattention==0.1.2`. Its package __init__ calls jax.lib.xla_bridge, which
jax no longer has, so this script loads the one module that holds the pure-JAX ring (ringattention_jax.py) from
the installed package by its path; nothing is vendored.

Both run the same inputs the way each is meant to be called: shard_map over the mesh axis "sequence" (8
devices), q, k, v [b, t, n, h] sharded along t, contiguous order (the peer has no load balancing and masks by
index), causal, query and key chunks of --block tokens for both. The peer takes causal_block_size=1 and
full-length segment ids replicated on every device; lrjax takes the local slices of global positions (and of the
segment ids). One more lrjax row runs the same data in zig-zag order (its load balancing, applied to the data
and undone on the result), which a real ring needs for causal attention and on simulated devices only changes
which blocks are skipped.

Per implementation: the forward + backward step (the gradient of sum(out * cotangent) in q, k, v) is compiled
once, its per-device memory read from XLA's memory_analysis (arguments + outputs + temporaries), then timed as
the minimum of --runs rounds that interleave the implementations (all devices share this host's cores, so the
time is the total work of the 8 devices). Outputs and gradients are compared with the peer's (max abs
difference); the run fails if they disagree beyond --atol.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import harness  # noqa: E402  (puts the repository root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ring_memory import footprint  # noqa: E402

from lrjax import ring as ring_lib  # noqa: E402
from lrjax import sharding as sharding_lib  # noqa: E402

PEER = "ringattention"
PEER_PIP = "pip install --no-deps ringattention==0.1.2"
AXIS = "sequence"


class PeerMissingError(RuntimeError):
  """The peer package is not installed (the message says how to install it)."""


def load_peer():
  """The installed ringattention_jax module, loaded by path (the package __init__ does not import on new jax)."""
  spec = importlib.util.find_spec(PEER)
  if spec is None or not spec.submodule_search_locations:
    raise PeerMissingError(f"the peer package {PEER!r} is not installed: {PEER_PIP}")
  path = os.path.join(list(spec.submodule_search_locations)[0], "ringattention_jax.py")
  module_spec = importlib.util.spec_from_file_location("ringattention_jax", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def peer_attention(peer, mesh, block: int, documents: bool):
  """(q, k, v, segment ids) -> out with the peer's ring under shard_map, as its README calls it."""
  blockwise_kwargs = dict(causal_block_size=1, query_chunk_size=block, key_chunk_size=block, deterministic=True,
                          dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32, policy=jax.checkpoint_policies.nothing_saveable,
                          precision=None, prevent_cse=True)
  fn = functools.partial(peer.ring_attention, axis_name=AXIS, float32_logits=True, cache_idx=None,
                         blockwise_kwargs=blockwise_kwargs)
  x = P(None, AXIS, None, None)
  seg_spec = P(None, None) if documents else None  # the peer slices full-length ids on every device
  ring = jax.shard_map(lambda q, k, v, seg: fn(q, k, v, None, seg), mesh=mesh, in_specs=(x, x, x, seg_spec),
                       out_specs=x, check_vma=False)
  return lambda q, k, v, pos, seg: ring(q, k, v, seg)  # positions: the peer derives them from device indices


def lrjax_attention(mesh, block: int):
  """(q, k, v, positions, segment ids) -> out with lrjax's ring (the data already in the ring's order)."""
  return lambda q, k, v, pos, seg: ring_lib.ring_attention_sharded(
      q, k, v, pos, pos, axis_name=AXIS, block_q=block, block_k=block, mesh=mesh, q_segment=seg, k_segment=seg)


def fwd_bwd(attention):
  """jit of (q, k, v, cotangent, pos, seg) -> (out, (dq, dk, dv)) for the loss sum(out * cotangent)."""
  def loss(q, k, v, ct, pos, seg):
    out = attention(q, k, v, pos, seg)
    return jnp.vdot(out, ct), out
  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return jax.jit(lambda *args: grad(*args)[::-1])


def inputs(t: int, heads: int, head_dim: int, documents: bool):
  """Host arrays: q, k, v, cotangent [1, t, heads, head_dim] f32, positions i32[1, t], segment ids or None."""
  rng = np.random.RandomState(0)
  q, k, v, ct = (rng.standard_normal((1, t, heads, head_dim)).astype(np.float32) for _ in range(4))
  pos = np.arange(t, dtype=np.int32)[None]
  seg = None
  if documents:  # 4 documents of random lengths, ids in increasing order
    cuts = np.sort(rng.choice(np.arange(1, t), 3, replace=False))
    seg = np.searchsorted(cuts, np.arange(t), side="right").astype(np.int32)[None]
  return q, k, v, ct, pos, seg


def place(data, mesh, order: str, replicated_segments: bool):
  """The host arrays in `order` (lrjax.ring.load_balance), on the mesh: per-token arrays sharded along t,
  segment ids replicated at full length when `replicated_segments` (the peer's convention)."""
  n = mesh.shape[AXIS]
  *xs, seg = ring_lib.load_balance(data, n, order)
  on = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
  sharded = lambda a: on(a, P(None, AXIS, *(None,) * (a.ndim - 2)))
  if seg is not None:
    seg = on(seg, P()) if replicated_segments else sharded(seg)
  return tuple(sharded(a) for a in xs) + (seg,)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=32768, help="total tokens")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--block", type=int, default=512, help="query and key chunk (both implementations)")
  parser.add_argument("--runs", type=int, default=3, help="interleaved timed rounds (the minimum is reported)")
  parser.add_argument("--documents", action="store_true", help="4 packed documents (segment ids)")
  parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |lrjax - peer| (f32)")
  args = harness.parse_args(parser, argv, quick=dict(length=4096, runs=1))
  if len(jax.devices()) < 8:
    raise SystemExit(f"need 8 (simulated) devices, have {len(jax.devices())}")
  try:
    peer = load_peer()
  except PeerMissingError as e:
    raise SystemExit(f"error: {e}") from None
  bench = harness.Bench.start("ring_vs_peer", args)
  mesh = sharding_lib.make_mesh({AXIS: 8})
  data = inputs(args.length, args.heads, args.head_dim, args.documents)
  print(f"ring of 8 simulated devices, causal{' + 4 documents' if args.documents else ''}, b=1 t={args.length} "
        f"heads={args.heads} head_dim={args.head_dim} f32, chunks {args.block}; fwd+bwd of sum(out * ct)")
  impls = {"ringattention 0.1.2 (peer)": (peer_attention(peer, mesh, args.block, args.documents), "none", True),
           "lrjax ring": (lrjax_attention(mesh, args.block), "none", False),
           "lrjax ring, zig-zag": (lrjax_attention(mesh, args.block), "zigzag", False)}
  compiled, memory, results, placed = {}, {}, {}, {}
  with sharding_lib.mesh_context(mesh):
    for name, (attention, order, replicated_segments) in impls.items():
      start = time.perf_counter()
      placed[name] = place(data, mesh, order, replicated_segments)
      compiled[name] = fwd_bwd(attention).lower(*placed[name]).compile()
      memory[name] = footprint(compiled[name])
      out, grads = compiled[name](*placed[name])  # the warm-up; its results, back in token order, are compared
      restore = lambda x: np.asarray(x)[:, np.argsort(ring_lib.permutation(args.length, 8, order))]
      results[name] = (restore(out), [restore(g) for g in grads])
      print(f"  compiled + first run {name}: {time.perf_counter() - start:.1f} s", flush=True)
    best = {name: float("inf") for name in impls}
    for _ in range(args.runs):
      for name in impls:
        with harness.timed() as timing:
          jax.block_until_ready(compiled[name](*placed[name]))
        best[name] = min(best[name], timing.wall_s)
  report(bench, impls, best, memory, results, args.atol)


def report(bench, impls, best, memory, results, atol: float) -> None:
  peer_name = next(iter(impls))
  (peer_out, peer_grads) = results[peer_name]
  print(f"  {'implementation':<28s} {'fwd+bwd s':>10s} {'MiB/device':>11s} {'temp MiB':>9s} "
        f"{'max|out-peer|':>14s} {'max|grad-peer|':>15s}")
  worst = 0.0
  for name in impls:
    out, grads = results[name]
    d_out = float(np.max(np.abs(out - peer_out)))
    d_grad = max(float(np.max(np.abs(g - p))) for g, p in zip(grads, peer_grads))
    worst = max(worst, d_out, d_grad)
    sec = bench.figure(f"{name}: fwd+bwd", best[name], "s", fmt=".2f")
    mib = bench.figure(f"{name}: memory per device", memory[name]["total"] / 2**20, "MiB", timed=False, fmt=".1f")
    if name != peer_name:
      bench.figure(f"{name}: max abs diff vs peer (out, grads)", f"{d_out:.1e}, {d_grad:.1e}", timed=False)
    print(f"  {name:<28s} {sec:>10s} {mib:>11s} {memory[name]['temp'] / 2**20:9.1f} {d_out:14.1e} {d_grad:15.1e}")
  for name in list(impls)[1:]:
    time_ratio = bench.ratio(f"{name} / peer: time (target <= 1)", best[name] / best[peer_name])
    mem_ratio = bench.ratio(f"{name} / peer: memory per device (target <= 1)",
                            memory[name]["total"] / memory[peer_name]["total"], timed=False)
    print(f"  {name} / peer: time {time_ratio}, memory per device {mem_ratio}")
  bench.finish()
  if worst > atol:
    raise SystemExit(f"error: lrjax and the peer disagree: max abs difference {worst:.2e} > --atol {atol:g}")


if __name__ == "__main__":
  main()
