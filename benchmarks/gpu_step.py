"""One-GPU step benchmark: attention blockwise vs the fast path, a ~1B LLaMA train step (MFU), long evaluation.

  python benchmarks/gpu_step.py            # on an H100/H200: the full sizes below, report in gpu_step.md
  python benchmarks/gpu_step.py --tiny     # tiny sizes (the default when no GPU is present; CI runs this)
  python benchmarks/gpu_step.py --quick    # the same as --tiny
  python benchmarks/gpu_step.py --report /tmp/gpu.md --attn_lens 8192,32768   # another report path, lengths

Part 1, attention fwd+bwd (the gradient of sum(out * cotangent) in q, k, v) at --attn_lens tokens (default
8k, 32k, 128k; batch 1, 32 query heads, 8 kv heads, head dim 64, causal, bf16), through lrjax.attention:
"blockwise" (the pure-JAX kernel, also the CPU path) against the fast paths of the backend: on a GPU
"auto" (cuDNN via jax.nn.dot_product_attention) and "pallas_gpu" (lrjax's Pallas-Triton kernel); off-GPU "xla".
Per implementation: step time (median), tokens/s, TFLOP/s, % of peak, and the compiled peak memory of the step
(XLA's memory_analysis: arguments + outputs + temporaries). Longer lengths run fewer repeats (the work grows
as t^2): max(1, --repeats * (32768 / t)^2), at most --repeats.
  attention FLOPs (causal, forward) = 2 * b * t^2 * n * h       (QK^T and PV, half of the square visible)
  fwd+bwd = 3.5 x forward                                        (backward: 5 matmuls vs the forward's 2)

Part 2, one AdamW fine-tuning step of a TinyLlama-1.1B-shaped model (22 layers, d 2048, 32 heads of 64,
4 kv heads, mlp 5632, vocab 32000; f32 params, bf16 compute, remat "full", attention "auto" (the fast path:
cuDNN on a GPU, blockwise on the CPU), chunked loss) at --model_len tokens (16k).
  model FLOPs per step = 3 * (2 * N_matmul * tokens + L * 2 * b * t^2 * n * h)
  N_matmul = L * (D*H*(2N + 2K) + 3*D*F) + D*V                   (every weight used in a matmul; the
                                                                   embedding gather is not a matmul)
  MFU = model FLOPs / step time / peak; remat's recomputed forward is not counted (that would be HFU).
  Peak: 989 TFLOP/s dense bf16 for H100 SXM and H200 (the 1,979 figure assumes 2:4 sparsity).

Part 3, perplexity evaluation of the same model (bf16 params and compute, attention "auto") at --eval_len tokens
(32k): the jitted forward + chunked NLL of one sequence, tokens/s and compiled memory.

The markdown report (--report, default gpu_step.md in the working directory) holds the device, the command and
the result block (figure | value | unit).
"""

from __future__ import annotations

import argparse
import sys

import harness  # first: puts the repository root on sys.path
import jax
import jax.numpy as jnp
import optax

from lrjax import attention as A
from lrjax import loss as L
from lrjax import model as M

H100_H200_PEAK_TFLOPS = 989.0
MIB = 2 ** 20
FULL = dict(attn_lens=(8192, 32768, 131072), attn_heads=(32, 8, 64), model_len=16384, eval_len=32768, block=512,
            repeats=5, model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=32768))
TINY = dict(attn_lens=(128, 256), attn_heads=(4, 2, 16), model_len=256, eval_len=256, block=64, repeats=1,
            model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=256))


def compiled_mib(compiled) -> float:
  """Peak memory of a compiled program in MiB: arguments + outputs + temporaries (less donated aliases)."""
  m = compiled.memory_analysis()
  total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return total / MIB


def median_time(fn, *args, repeats: int) -> harness.Timing:
  """Median wall (and host CPU) seconds of fn(*args) after one warm-up call."""
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


def _failed(bench: harness.Bench, name: str, e: Exception) -> None:
  """Reports a failed measurement (never a silent fallback: e.g. cuDNN missing for this shape or version)."""
  print(f"  {name:<44s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
  bench.figure(name, "FAILED", timed=False)


def attention_impls(on_gpu: bool) -> tuple[str, ...]:
  """lrjax.attention implementations compared: blockwise first, then the backend's fast paths."""
  return ("blockwise", "auto", "pallas_gpu") if on_gpu else ("blockwise", "xla")


def bench_attention(t: int, heads: tuple[int, int, int], block: int, repeats: int, impls: tuple[str, ...],
                    peak: float, bench: harness.Bench) -> None:
  n, k, h = heads
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (1, t, n, h), jnp.bfloat16)
  kk = jax.random.normal(keys[1], (1, t, k, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, t, k, h), jnp.bfloat16)
  dout = jax.random.normal(keys[3], (1, t, n, h), jnp.bfloat16)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  flops = 3.5 * attention_flops(1, t, n, h)
  repeats = min(repeats, max(1, round(repeats * (32768 / t) ** 2)))
  print(f"attention fwd+bwd, causal bf16, b=1 t={t} heads={n} kv_heads={k} head_dim={h} "
        f"({flops / 1e12:.3g} TFLOP per step, {repeats} timed repeats)", flush=True)
  seconds = {}
  for impl in impls:
    name = f"attention t={t}: {impl}" + (f" ({A.resolve(impl)})" if A.resolve(impl) != impl else "")
    attend = lambda q, k, v, impl=impl: A.attention(q, k, v, pos, pos, implementation=impl, block_q=block,
                                                    block_k=block)
    loss = lambda q, k, v, attend=attend: jnp.vdot(attend(q, k, v).astype(jnp.float32), dout.astype(jnp.float32))
    try:
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kk, v).compile()
      timing = median_time(step, q, kk, v, repeats=repeats)
    except Exception as e:  # noqa: BLE001  (reported in the table)
      _failed(bench, name, e)
      continue
    sec = seconds[impl] = timing.wall_s
    ms = bench.figure(f"{name}: fwd+bwd", sec * 1e3, "ms", fmt=".2f")
    tok = bench.figure(f"{name}: tokens/s", t / sec, "tokens/s", fmt=".0f")
    tflops = bench.figure(f"{name}: TFLOP/s", flops / sec / 1e12, "TFLOP/s", fmt=".2f")
    mib = bench.figure(f"{name}: compiled memory", compiled_mib(step), "MiB", timed=False, fmt=".1f")
    print(f"  {name:<44s} {ms:>10s} ms {tok:>10s} tok/s {tflops:>8s} TFLOP/s {100 * flops / sec / 1e12 / peak:5.1f}% "
          f"of peak {mib:>7s} MiB   (median {timing})", flush=True)
  for impl in impls[1:]:
    if impl in seconds and "blockwise" in seconds:
      speedup = bench.ratio(f"attention t={t}: {impl} speed-up over blockwise", seconds["blockwise"] / seconds[impl])
      print(f"  {impl} speed-up over blockwise: {speedup}")


def _model_config(model_kw: dict, block: int, **kw) -> M.ModelConfig:
  return M.ModelConfig(**model_kw, dtype="bfloat16", attention="auto", block_q=block, block_k=block,
                       scan_layers=True, **kw)


def _batch(cfg: M.ModelConfig, t: int) -> dict:
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, t + 1), 0, cfg.vocab_size)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.arange(t, dtype=jnp.int32)[None],
          "weights": jnp.ones((1, t), jnp.float32)}


def _nll(cfg: M.ModelConfig, params, batch, rope):
  hidden = M.forward(cfg, params, batch["tokens"], batch["positions"], rope)
  return L.chunked_nll(hidden, M.head_weights(cfg, params), batch["targets"], batch["weights"])


def bench_model_step(model_kw: dict, t: int, block: int, repeats: int, peak: float, bench: harness.Bench) -> None:
  cfg = _model_config(model_kw, block, param_dtype="float32", remat="full")
  name = f"train step t={t} [{cfg.attention}: {A.resolve(cfg.attention)}]"
  print(f"fine-tuning step (AdamW, f32 params, bf16 compute, remat full): {cfg.num_params() / 1e9:.3f}B params, "
        f"b=1 t={t}, {model_step_flops(cfg, 1, t) / 1e12:.3g} TFLOP per step", flush=True)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.adamw(1e-5)
  opt_state = opt.init(params)
  batch, rope = _batch(cfg, t), jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=t))

  def loss_fn(params, batch):
    nll, count = _nll(cfg, params, batch, rope)
    return nll.sum() / count.sum()

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  flops = model_step_flops(cfg, 1, t)
  try:
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    state = [params, opt_state]

    def run():
      state[0], state[1], loss = step(state[0], state[1], batch)
      return loss

    timing = median_time(run, repeats=repeats)
  except Exception as e:  # noqa: BLE001
    _failed(bench, name, e)
    return
  sec = timing.wall_s
  ms = bench.figure(name, sec * 1e3, "ms", fmt=".1f")
  tok = bench.figure(f"{name}: tokens/s", t / sec, "tokens/s", fmt=".0f")
  mfu = bench.figure(f"{name}: MFU of {peak:g} TFLOP/s", 100 * flops / sec / 1e12 / peak, "%", fmt=".1f")
  mib = bench.figure(f"{name}: compiled memory", compiled_mib(step), "MiB", timed=False, fmt=".1f")
  print(f"  {name:<44s} {ms:>10s} ms {tok:>10s} tok/s {flops / sec / 1e12:8.2f} TFLOP/s   MFU {mfu}%   "
        f"{mib} MiB   (median {timing})", flush=True)


def bench_eval(model_kw: dict, t: int, block: int, repeats: int, bench: harness.Bench) -> None:
  cfg = _model_config(model_kw, block, param_dtype="bfloat16")
  name = f"evaluation t={t} [{cfg.attention}: {A.resolve(cfg.attention)}]"
  print(f"perplexity evaluation (bf16 params and compute): {cfg.num_params() / 1e9:.3f}B params, b=1 t={t}",
        flush=True)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  batch, rope = _batch(cfg, t), jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=t))
  try:
    nll = jax.jit(lambda params, batch: _nll(cfg, params, batch, rope)).lower(params, batch).compile()
    timing = median_time(nll, params, batch, repeats=repeats)
  except Exception as e:  # noqa: BLE001
    _failed(bench, name, e)
    return
  sec = timing.wall_s
  tok = bench.figure(f"{name}: tokens/s", t / sec, "tokens/s", fmt=".0f")
  mib = bench.figure(f"{name}: compiled memory", compiled_mib(nll), "MiB", timed=False, fmt=".1f")
  print(f"  {name:<44s} {sec * 1e3:10.1f} ms {tok:>10s} tok/s   {mib} MiB   (median {timing})", flush=True)


def write_report(path: str, bench: harness.Bench, device: str, block: str) -> None:
  """The markdown report: a title, the device and command, the result block."""
  command = " ".join(["python", "benchmarks/gpu_step.py", *sys.argv[1:]])
  text = f"# benchmarks/gpu_step.py\n\ndevice: {device}\n\ncommand: `{command}`\n\n{block}\n"
  with open(path, "w") as f:
    f.write(text)
  print(f"report: {path}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--tiny", action="store_true", help="tiny sizes (default when no GPU is present; --quick)")
  size.add_argument("--full", action="store_true", help="full sizes even without a GPU (very slow)")
  parser.add_argument("--attn_lens", help="comma-separated attention lengths (default 8192,32768,131072)")
  parser.add_argument("--model_len", type=int, help="train step tokens (default 16384, tiny 256)")
  parser.add_argument("--eval_len", type=int, help="evaluation tokens (default 32768, tiny 256)")
  parser.add_argument("--block", type=int, help="blockwise block size (default 512, tiny 64)")
  parser.add_argument("--repeats", type=int, help="timed repeats after the warm-up")
  parser.add_argument("--peak_tflops", type=float, default=H100_H200_PEAK_TFLOPS,
                      help="dense bf16 peak used for utilisation (989 for H100 SXM / H200)")
  parser.add_argument("--skip_model", action="store_true", help="only the attention benchmark")
  parser.add_argument("--report", default="gpu_step.md", help="markdown report path")
  args = harness.parse_args(parser, argv, quick=dict(tiny=True))

  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  tiny = args.tiny or (not on_gpu and not args.full)
  sizes = dict(TINY if tiny else FULL)
  for key in ("model_len", "eval_len", "block", "repeats"):
    if getattr(args, key) is not None:
      sizes[key] = getattr(args, key)
  if args.attn_lens:
    sizes["attn_lens"] = tuple(int(x) for x in args.attn_lens.split(","))
  bench = harness.Bench.start("gpu_step", args)
  device = f"{jax.devices()[0].device_kind} ({backend}), {'tiny' if tiny else 'full'} sizes"
  print(f"device: {device}, peak {args.peak_tflops:g} TFLOP/s dense bf16 assumed")
  if not on_gpu:
    print("note: no GPU; the figures below only show that the script works, not GPU performance")
  for t in sizes["attn_lens"]:
    bench_attention(t, sizes["attn_heads"], sizes["block"], sizes["repeats"], attention_impls(on_gpu),
                    args.peak_tflops, bench)
  if not args.skip_model:
    bench_model_step(sizes["model"], sizes["model_len"], sizes["block"], sizes["repeats"], args.peak_tflops, bench)
    bench_eval(sizes["model"], sizes["eval_len"], sizes["block"], sizes["repeats"], bench)
  write_report(args.report, bench, device, bench.finish())


if __name__ == "__main__":
  main()
