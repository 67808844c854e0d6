"""One-GPU step benchmark: blockwise attention vs cuDNN attention, and fine-tuning MFU of a ~1B LLaMA.

  python benchmarks/gpu_step.py            # on an H100/H200: 32k-token attention, ~1.1B model at 16k tokens
  python benchmarks/gpu_step.py --tiny     # tiny sizes (the default when no GPU is present; CI runs this)
  python benchmarks/gpu_step.py --quick    # the same as --tiny

Part 1, attention fwd+bwd step time at --attn_len tokens (batch 1, 32 query heads, 8 kv heads, head dim 64,
causal, bf16): lrjax's pure-JAX blockwise kernel (the per-device kernel of ring attention) side by side with
jax.nn.dot_product_attention(implementation="cudnn") ("xla" off-GPU, where cuDNN does not exist).
  attention FLOPs (causal, forward) = 2 * b * t^2 * n * h       (QK^T and PV, half of the square visible)
  fwd+bwd = 3.5 x forward                                        (backward: 5 matmuls vs the forward's 2)

Part 2, one AdamW fine-tuning step of a TinyLlama-1.1B-shaped model (22 layers, d 2048, 32 heads of 64,
4 kv heads, mlp 5632, vocab 32000; f32 params, bf16 compute, remat "full", blockwise attention, chunked
loss) at --model_len tokens.
  model FLOPs per step = 3 * (2 * N_matmul * tokens + L * 2 * b * t^2 * n * h)
  N_matmul = L * (D*H*(2N + 2K) + 3*D*F) + D*V                   (every weight used in a matmul; the
                                                                   embedding gather is not a matmul)
  MFU = model FLOPs / step time / peak; remat's recomputed forward is not counted (that would be HFU).
  Peak: 989 TFLOP/s dense bf16 for H100 SXM and H200 (the 1,979 figure assumes 2:4 sparsity).
"""

from __future__ import annotations

import argparse

import harness  # first: puts the repository root on sys.path
import jax
import jax.numpy as jnp
import optax

from lrjax import attention as A
from lrjax import loss as L
from lrjax import model as M

H100_H200_PEAK_TFLOPS = 989.0
FULL = dict(attn_len=32768, attn_heads=(32, 8, 64), model_len=16384, block=512, repeats=5,
            model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                       num_kv_heads=4, head_dim=64, max_position_embeddings=16384))
TINY = dict(attn_len=256, attn_heads=(4, 2, 16), model_len=256, block=64, repeats=1,
            model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=256))


def median_time(fn, *args, repeats: int) -> harness.Timing:
  """Median wall (and host CPU) seconds of fn(*args) after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  timings = []
  for _ in range(repeats):
    with harness.timed() as timing:
      jax.block_until_ready(fn(*args))
    timings.append(timing)
  return harness.median_timing(timings)


def attention_flops(b: int, t: int, n: int, h: int, causal: bool = True) -> float:
  """Forward attention FLOPs: QK^T and PV, 2 FLOPs per multiply-add; causal sees half the square."""
  return 4.0 * b * t * t * n * h * (0.5 if causal else 1.0)


def model_step_flops(cfg: M.ModelConfig, b: int, t: int) -> float:
  """Model FLOPs of one training step (forward + backward = 3 x forward), causal attention."""
  d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
  n_matmul = cfg.num_layers * (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f) + d * v
  forward = 2.0 * n_matmul * b * t + cfg.num_layers * attention_flops(b, t, cfg.num_heads, hd)
  return 3.0 * forward


def bench_attention(t: int, heads: tuple[int, int, int], block: int, repeats: int, reference_impl: str,
                    peak: float, bench: harness.Bench) -> None:
  n, k, h = heads
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (1, t, n, h), jnp.bfloat16)
  kk = jax.random.normal(keys[1], (1, t, k, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, t, k, h), jnp.bfloat16)
  dout = jax.random.normal(keys[3], (1, t, n, h), jnp.bfloat16)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  impls = {
      f"blockwise (block {block})": lambda q, k, v: A.blockwise_attention(q, k, v, pos, pos, True, block, block,
                                                                          None),
      f"dot_product_attention[{reference_impl}]": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation=reference_impl),
  }
  flops = 3.5 * attention_flops(1, t, n, h)
  print(f"attention fwd+bwd, causal bf16, b=1 t={t} heads={n} kv_heads={k} head_dim={h} "
        f"({flops / 1e12:.3g} TFLOP per step)")
  results = {}
  for name, fn in impls.items():
    step = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32),
                                                     dout.astype(jnp.float32)), argnums=(0, 1, 2)))
    try:
      timing = median_time(step, q, kk, v, repeats=repeats)
    except Exception as e:  # report, never silently fall back (e.g. cuDNN missing for this shape/version)
      print(f"  {name:<40s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      bench.figure(f"attention t={t}: {name}", "FAILED", timed=False)
      continue
    sec = timing.wall_s
    results[name] = sec
    ms = bench.figure(f"attention t={t}: {name}", sec * 1e3, "ms", fmt=".2f")
    tflops = bench.figure(f"attention t={t}: {name}", flops / sec / 1e12, "TFLOP/s", fmt=".2f")
    print(f"  {name:<40s} {ms:>10s} ms   {tflops:>8s} TFLOP/s   {100 * flops / sec / 1e12 / peak:5.1f}% of peak   "
          f"(median {timing})")
  if len(results) == 2:
    (a, ta), (b, tb) = results.items()
    reference = b.split("[")[1][:-1]
    print(f"  ratio blockwise / {reference}: {bench.ratio(f'attention t={t}: blockwise / {reference} time', ta / tb)}"
          f" the time")


def bench_model_step(model_kw: dict, t: int, block: int, repeats: int, attention: str, peak: float,
                     bench: harness.Bench) -> None:
  cfg = M.ModelConfig(**model_kw, dtype="bfloat16", param_dtype="float32", attention=attention,
                      block_q=block, block_k=block, remat="full", scan_layers=True)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.adamw(1e-5)
  opt_state = opt.init(params)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, t + 1), 0, cfg.vocab_size)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.arange(t, dtype=jnp.int32)[None],
           "weights": jnp.ones((1, t), jnp.float32)}
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=t))

  def loss_fn(params, batch):
    hidden = M.forward(cfg, params, batch["tokens"], batch["positions"], rope)
    nll, count = L.chunked_nll(hidden, M.head_weights(cfg, params), batch["targets"], batch["weights"])
    return nll.sum() / count.sum()

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state]

  def run():
    state[0], state[1], loss = train_step(state[0], state[1], batch)
    return loss

  flops = model_step_flops(cfg, 1, t)
  try:
    timing = median_time(run, repeats=repeats)
  except Exception as e:
    print(f"  model step [{attention}] FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    bench.figure(f"model step t={t} [{attention}]", "FAILED", timed=False)
    return
  sec = timing.wall_s
  ms = bench.figure(f"model step t={t} [{attention}]", sec * 1e3, "ms", fmt=".1f")
  mfu = bench.figure(f"model step t={t} [{attention}]: MFU of {peak:g} TFLOP/s", 100 * flops / sec / 1e12 / peak,
                     "%", fmt=".1f")
  print(f"  model step [{attention:<9s}] {ms:>10s} ms   {t / sec:10.0f} tok/s   "
        f"{flops / sec / 1e12:8.2f} TFLOP/s   MFU {mfu}%   (median {timing})")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--tiny", action="store_true", help="tiny sizes (default when no GPU is present; --quick)")
  size.add_argument("--full", action="store_true", help="full sizes even without a GPU (very slow)")
  parser.add_argument("--attn_len", type=int, help="attention benchmark tokens (default 32768, tiny 256)")
  parser.add_argument("--model_len", type=int, help="model step tokens (default 16384, tiny 256)")
  parser.add_argument("--block", type=int, help="blockwise block size (default 512, tiny 64)")
  parser.add_argument("--repeats", type=int, help="timed repeats after the warm-up")
  parser.add_argument("--peak_tflops", type=float, default=H100_H200_PEAK_TFLOPS,
                      help="dense bf16 peak used for utilisation (989 for H100 SXM / H200)")
  parser.add_argument("--skip_model", action="store_true", help="only the attention benchmark")
  args = harness.parse_args(parser, argv, quick=dict(tiny=True))

  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  tiny = args.tiny or (not on_gpu and not args.full)
  sizes = dict(TINY if tiny else FULL)
  for key in ("attn_len", "model_len", "block", "repeats"):
    if getattr(args, key) is not None:
      sizes[key] = getattr(args, key)
  bench = harness.Bench.start("gpu_step", args)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}), {'tiny' if tiny else 'full'} sizes, "
        f"peak {args.peak_tflops:g} TFLOP/s dense bf16 assumed")
  if not on_gpu:
    print("note: no GPU; the figures below only show that the script works, not GPU performance")
  reference_impl = "cudnn" if on_gpu else "xla"
  bench_attention(sizes["attn_len"], sizes["attn_heads"], sizes["block"], sizes["repeats"], reference_impl,
                  args.peak_tflops, bench)
  if args.skip_model:
    bench.finish()
    return
  cfg = M.ModelConfig(**sizes["model"])
  print(f"fine-tuning step (AdamW, f32 params, bf16 compute, remat full): {cfg.num_params() / 1e9:.3f}B params, "
        f"b=1 t={sizes['model_len']}, {model_step_flops(cfg, 1, sizes['model_len']) / 1e12:.3g} TFLOP per step")
  # Off-GPU the model step runs once, blockwise only: it keeps the script working, cuDNN is the GPU comparison.
  for attention in ("blockwise", reference_impl) if on_gpu else ("blockwise",):
    bench_model_step(sizes["model"], sizes["model_len"], sizes["block"], sizes["repeats"], attention,
                     args.peak_tflops, bench)
  bench.finish()


if __name__ == "__main__":
  main()
