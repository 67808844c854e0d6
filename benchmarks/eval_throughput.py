"""Perplexity-evaluation throughput: lrjax vs transformers (torch CPU, sdpa) on the same weights and tokens.

Both sides compute the summed next-token NLL of a batch of windows, forward only, float32:
  lrjax:        lrjax.evaluate.window_nll under jax.jit (one compiled program, chunked loss)
  transformers: LlamaForCausalLM(attn_implementation="sdpa") under torch.no_grad, logits + cross-entropy
The random lrjax parameters are copied into the torch model, and the two NLLs are checked to agree before
timing. Runs alternate (lrjax, torch, lrjax, torch, ...) so load from other processes hits both alike; the
first call of each is warm-up and excluded; the figure is the median. Both use every core (XLA's CPU backend
always does; torch is set to os.cpu_count() threads). Process CPU seconds are printed beside wall time: when
they are about equal on a multi-core machine, other jobs were holding the other cores.

  python benchmarks/eval_throughput.py                  # both shapes
  python benchmarks/eval_throughput.py --shapes=a --runs=7 --threads=2
  python benchmarks/eval_throughput.py --attention=blockwise --block_q=512 --block_k=1024   # try a variant

Shapes: (a) d_model 256, 4 layers, 4 heads, vocab 256, 8 x 2048 tokens; (b) LLaMA-shaped d_model 1024,
8 layers, 16 query / 4 key-value heads, ffn 2816, vocab 32000, 1 x 4096 tokens.
"""

from __future__ import annotations

import argparse
import os
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="a,b", help="comma list of a, b")
  p.add_argument("--runs", type=int, default=5, help="timed runs of each side (after one warm-up)")
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch threads; keep the default (all cores), which is what XLA's CPU backend uses")
  p.add_argument("--attention", default=None, help="override lrjax attention implementation")
  p.add_argument("--block_q", type=int, default=None)
  p.add_argument("--block_k", type=int, default=None)
  p.add_argument("--skip_torch", action="store_true")
  return p.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lrjax import evaluate  # noqa: E402
from lrjax import model as model_lib  # noqa: E402

SHAPES = {
    "a": dict(config=dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                          num_kv_heads=4, head_dim=64), batch=8, length=2048),
    "b": dict(config=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                          num_heads=16, num_kv_heads=4, head_dim=64), batch=1, length=4096),
}


def to_torch(cfg: model_lib.ModelConfig, params: dict):
  """A transformers LlamaForCausalLM holding the same weights (our layout: q [L,D,N,H], HF: [N*H, D])."""
  import transformers
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False,
      mlp_bias=False)
  hf_cfg._attn_implementation = "sdpa"
  model = transformers.LlamaForCausalLM(hf_cfg).eval().float()
  p = jax.tree.map(np.asarray, params)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
  sd = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"]),
        "lm_head.weight": t(p["lm_head"].T)}
  lp = p["layers"]
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    d = cfg.hidden_size
    sd[pre + "input_layernorm.weight"] = t(lp["attn_norm"][i])
    sd[pre + "post_attention_layernorm.weight"] = t(lp["mlp_norm"][i])
    for name in ("q", "k", "v"):
      sd[pre + f"self_attn.{name}_proj.weight"] = t(lp[name][i].reshape(d, -1).T)
    sd[pre + "self_attn.o_proj.weight"] = t(lp["o"][i].reshape(-1, d).T)
    for name in ("gate", "up", "down"):
      sd[pre + f"mlp.{name}_proj.weight"] = t(lp[name][i].T)
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [m for m in missing if "rotary_emb" not in m]
  if missing or unexpected:
    raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")
  return model


def torch_nll(model, tokens: torch.Tensor) -> torch.Tensor:
  with torch.no_grad():
    logits = model(input_ids=tokens, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1), reduction="none").view(
                                                 tokens.shape[0], -1).sum(-1)


def bench(name: str, spec: dict):
  overrides = {k: v for k, v in (("attention", ARGS.attention), ("block_q", ARGS.block_q),
                                 ("block_k", ARGS.block_k)) if v is not None}
  cfg = model_lib.ModelConfig(**spec["config"], **overrides)
  b, t = spec["batch"], spec["length"]
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens_np = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
  tokens = jnp.asarray(tokens_np)
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=t))
  weights = jnp.ones((b, t - 1), jnp.float32)
  fn = evaluate.compiled_window_nll(cfg)  # what lrjax.evaluate.perplexity runs

  def run_jax():
    return np.asarray(jax.block_until_ready(fn(params, tokens, rope, weights)[0]))

  sides = {"lrjax": run_jax}
  if not ARGS.skip_torch:
    torch_model = to_torch(cfg, params)
    tokens_t = torch.from_numpy(tokens_np.astype(np.int64))
    sides["transformers"] = lambda: torch_nll(torch_model, tokens_t).numpy()
  warm = {k: f() for k, f in sides.items()}  # warm-up (compilation, allocator)
  if "transformers" in warm:
    np.testing.assert_allclose(warm["lrjax"], warm["transformers"], rtol=2e-4)
  times = {k: [] for k in sides}
  cpu = {k: [] for k in sides}
  for _ in range(ARGS.runs):
    for k, f in sides.items():
      c0, t0 = time.process_time(), time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  tps = {k: b * t / float(np.median(v)) for k, v in times.items()}
  desc = (f"({name}) d_model {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}:{cfg.num_kv_heads} "
          f"heads, vocab {cfg.vocab_size}, {b} x {t} tokens; attention={cfg.attention} "
          f"blocks={cfg.block_q}x{cfg.block_k}")
  print(desc)
  for k, v in times.items():
    print(f"  {k:13s} {tps[k]:9.0f} tokens/s   median {np.median(v):.3f}s wall, {np.median(cpu[k]):.3f}s cpu  "
          f"runs {[round(x, 3) for x in v]}")
  if "transformers" in tps:
    print(f"  ratio lrjax/transformers = {tps['lrjax'] / tps['transformers']:.2f}")
  return tps


def main():
  torch.set_num_threads(ARGS.threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
        f"threads {ARGS.threads}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
  for name in ARGS.shapes.split(","):
    bench(name, SHAPES[name])
  print(f"load average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
  main()
