"""Perplexity-evaluation throughput: lrjax vs transformers (torch CPU, sdpa) on the same weights and tokens.

Both sides compute the summed next-token NLL of a batch of windows, forward only, float32:
  lrjax:        lrjax.perplexity.window_nll under jax.jit (one compiled program, chunked loss)
  transformers: LlamaForCausalLM(attn_implementation="sdpa") under torch.no_grad, logits + cross-entropy
The random lrjax parameters are copied into the torch model, and the two NLLs are checked to agree before
timing. Runs alternate (lrjax, torch, lrjax, torch, ...) so load from other processes hits both alike; the
first call of each is warm-up and excluded; the figure is the median. Both use every core (XLA's CPU backend
always does; torch is set to os.cpu_count() threads). Process CPU seconds are printed beside wall time: when
they are about equal on a multi-core machine, other jobs were holding the other cores (and the ratio is
withheld when the load before the start says so; see benchmarks/harness.py).

  python benchmarks/eval_throughput.py                  # both shapes
  python benchmarks/eval_throughput.py --shapes=a --runs=7 --threads=2
  python benchmarks/eval_throughput.py --attention=blockwise --block_q=512 --block_k=1024   # try a variant
  python benchmarks/eval_throughput.py --quick          # smoke run: shape (a) at 2 x 512 tokens, one run

Shapes: (a) d_model 256, 4 layers, 4 heads, vocab 256, 8 x 2048 tokens; (b) LLaMA-shaped d_model 1024,
8 layers, 16 query / 4 key-value heads, ffn 2816, vocab 32000, 1 x 4096 tokens.
"""

from __future__ import annotations

import argparse
import os

import harness  # first: puts the repository root on sys.path


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
  p.add_argument("--batch", type=int, default=None, help="override every shape's batch")
  p.add_argument("--length", type=int, default=None, help="override every shape's window length")
  return harness.parse_args(p, quick=dict(shapes="a", batch=2, length=512, runs=1))


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lrjax import perplexity  # noqa: E402
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


def measure(name: str, spec: dict, bench: harness.Bench) -> dict[str, float]:
  """Times one shape; records tokens/s of each side and their ratio in `bench`; returns tokens/s by side."""
  overrides = {k: v for k, v in (("attention", ARGS.attention), ("block_q", ARGS.block_q),
                                 ("block_k", ARGS.block_k)) if v is not None}
  cfg = model_lib.ModelConfig(**spec["config"], **overrides)
  b, t = ARGS.batch or spec["batch"], ARGS.length or spec["length"]
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens_np = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
  tokens = jnp.asarray(tokens_np)
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=t))
  weights = jnp.ones((b, t - 1), jnp.float32)
  fn = perplexity.compiled_window_nll(cfg)  # what lrjax.perplexity.perplexity runs

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
  timings = {k: [] for k in sides}
  for _ in range(ARGS.runs):
    for k, f in sides.items():
      with harness.timed() as timing:
        f()
      timings[k].append(timing)
  desc = (f"({name}) d_model {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}:{cfg.num_kv_heads} "
          f"heads, vocab {cfg.vocab_size}, {b} x {t} tokens; attention={cfg.attention} "
          f"blocks={cfg.block_q}x{cfg.block_k}")
  print(desc)
  tps = {}
  for k, v in timings.items():
    median = harness.median_timing(v)
    tps[k] = b * t / median.wall_s
    shown = bench.figure(f"({name}) {k}, {b} x {t} tokens", tps[k], "tokens/s", fmt=".0f")
    bench.figure(f"({name}) {k} median wall / cpu", f"{median.wall_s:.3f} / {median.cpu_s:.3f}", "s")
    print(f"  {k:13s} {shown} tokens/s   median {median}  runs {[round(x.wall_s, 3) for x in v]}")
  if "transformers" in tps:
    print(f"  ratio lrjax/transformers = "
          f"{bench.ratio(f'({name}) lrjax / transformers', tps['lrjax'] / tps['transformers'])}")
  return tps


def main():
  torch.set_num_threads(ARGS.threads)
  bench = harness.Bench.start("eval_throughput", ARGS)
  print(f"torch threads {ARGS.threads}")
  for name in ARGS.shapes.split(","):
    measure(name, SHAPES[name], bench)
  bench.finish()


if __name__ == "__main__":
  main()
