"""Train-step throughput: lrjax (jitted, donated AdamW step) vs transformers + torch AdamW, same model and batch.

  python benchmarks/train_throughput.py [--batch 32] [--length 256] [--steps 5] [--rounds 3] [--quick]

Model: the built-in model's architecture (configs/pretrain.py: d_model 256, 4 layers, 4 query / 2 kv heads,
head_dim 64, d_ff 768, vocab 256), batch 32 x 256 tokens, f32 on CPU. Both sides run one full optimizer step
(forward, backward, clip, AdamW) per iteration; timing rounds alternate between the frameworks so that load
from other processes hits both alike; the median round counts.

Prints tokens/s of each lrjax execution variant (attention implementation, scanned or unrolled layers) and of
torch, the ratio lrjax/torch, and FLOP utilisation: model FLOPs/s (lrjax.train.flops_per_token: 6 N + causal
attention) over the best f32 matmul FLOP/s measured in this run (jax and torch, 1024^3 and 2048^3). Both
"vs torch" and "FLOP util" are ratios of two timings: withheld when the machine was busy (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import functools
import time

import harness  # first: puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain
from lrjax import sharding as sharding_lib
from lrjax import train


def matmul_peak() -> dict:
  import torch
  out = {}
  for n in (1024, 2048):
    out[f"jax {n}"] = train.measure_peak_flops(n, repeats=5)
    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      a @ a
      best = min(best, time.perf_counter() - t0)
    out[f"torch {n}"] = 2 * n ** 3 / best
  return out


def lrjax_runner(model_cfg, batch: int, length: int, params=None, tokens: np.ndarray | None = None):
  """A closure running n lrjax train steps; the state is donated and carried along.

  params: initial parameters (default: random). tokens: i32[batch, length + 1] (default: random).
  """
  c = pretrain.get_config()
  stage = train.parse_stages(c, model_cfg)[0]
  optimizer = train.make_optimizer(c.optimizer, stage)
  mesh = sharding_lib.make_mesh({}, devices=jax.devices()[:1])
  with sharding_lib.mesh_context(mesh):
    state = train.init_state(model_cfg, optimizer, jax.random.PRNGKey(0), params=params)
    sh = train.state_shardings(mesh, jax.eval_shape(lambda: state), optimizer)
    step = train.jit_train_step(train.make_train_step(model_cfg, optimizer, loss_chunk=c.loss_chunk), mesh, sh)
  if tokens is None:
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch, length + 1), dtype=np.int32)
  tokens = tokens[None]
  host = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (1, batch, length)).copy(),
          "weights": np.ones((1, batch, length), np.float32)}
  data = jax.device_put(host, train.batch_sharding(mesh))
  rope = jax.tree.map(jnp.asarray, model_cfg.rope_arrays(seq_len=length))
  box = {"state": jax.device_put(state, sh)}

  def run(n):
    for _ in range(n):
      box["state"], metrics = step(box["state"], data, rope)
    jax.block_until_ready(metrics["loss"])
  return run


def torch_runner(model_cfg, batch: int, length: int):
  """The same step in transformers + torch AdamW, on a randomly initialised LlamaForCausalLM."""
  import torch
  import transformers
  hf = transformers.LlamaConfig(
      vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
      intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_layers,
      num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
      head_dim=model_cfg.head_dim, max_position_embeddings=model_cfg.max_position_embeddings,
      rms_norm_eps=model_cfg.rms_norm_eps, tie_word_embeddings=False, attention_bias=False)
  torch.manual_seed(0)
  return torch_train_runner(transformers.LlamaForCausalLM(hf),
                            torch.randint(0, model_cfg.vocab_size, (batch, length + 1)))


def torch_train_runner(model, tokens):
  """A closure running n steps of `model` (a transformers causal LM) on tokens [batch, length + 1]: forward,
  cross-entropy, backward, clip 1.0, torch AdamW (the hyper-parameters of configs/pretrain.py)."""
  import torch
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def run(n):
    for _ in range(n):
      logits = model(input_ids=inputs, use_cache=False).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="steps per timing round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--variants", default="xla/scan,xla/unrolled,blockwise/scan,reference/scan")
  args = harness.parse_args(p, quick=dict(batch=8, steps=1, rounds=1, variants="xla/scan"))
  import torch
  bench = harness.Bench.start("train_throughput", args)
  print(f"torch {torch.get_num_threads()} threads; batch {args.batch} x {args.length}")
  base = train.model_config(pretrain.get_config())
  runners = {}
  for v in args.variants.split(","):
    attention, layers = v.split("/")
    cfg = base.replace(attention=attention, scan_layers=layers == "scan")
    runners[f"lrjax {v}"] = lrjax_runner(cfg, args.batch, args.length)
  runners["torch"] = torch_runner(base, args.batch, args.length)
  for name, run in runners.items():  # compile / warm up with one step
    with harness.timed() as timing:
      run(1)
    print(f"  warm-up {name}: {timing}")
  rounds = harness.interleaved({name: functools.partial(run, args.steps) for name, run in runners.items()},
                               args.rounds, warm_up=False)
  peaks = matmul_peak()
  peak = max(peaks.values())
  fpt = train.flops_per_token(base, args.length)
  tokens = args.batch * args.length
  shown = [f"{k} {bench.figure(f'matmul peak {k}', v / 1e9, 'GFLOP/s', fmt='.1f')}" for k, v in peaks.items()]
  print("matmul peak (GFLOP/s): " + ", ".join(shown))
  print(f"model FLOPs/token {fpt / 1e6:.2f}M (6N + causal attention, N = {base.num_params() / 1e6:.2f}M params)")
  per_round = {name: harness.median_timing(t) for name, t in rounds.items()}  # args.steps steps each
  tps = {name: tokens * args.steps / t.wall_s for name, t in per_round.items()}
  print(f"{'variant':24s} {'s/step':>8s} {'cpu s/step':>10s} {'tokens/s':>10s} {'vs torch':>9s} {'FLOP util':>10s}")
  for name, t in per_round.items():
    bench.figure(f"{name}: step, batch {args.batch} x {args.length}", t.wall_s / args.steps, "s", fmt=".3f")
    throughput = bench.figure(f"{name}: throughput", tps[name], "tokens/s", fmt=".0f")
    versus = bench.ratio(f"{name} / torch (tokens/s)", tps[name] / tps["torch"]) if name != "torch" else "-"
    util = bench.ratio(f"{name}: model FLOP/s / best matmul FLOP/s", tps[name] * fpt / peak, fmt=".1%", suffix="")
    print(f"{name:24s} {t.wall_s / args.steps:8.3f} {t.cpu_s / args.steps:10.3f} {throughput:>10s} {versus:>9s} "
          f"{util:>10s}")
  bench.finish()


if __name__ == "__main__":
  main()
