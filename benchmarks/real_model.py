"""Perplexity evaluation of the real SmolLM2-135M: lrjax vs transformers (sdpa), same weights, same tokens.

Both sides compute the summed next-token NLL of one window of real text (GPL-3 as Debian ships it, repeated to
length), forward only, float32: lrjax through lrjax.perplexity's compiled program (the GGUF dequantised by
lrjax.weights.gguf), transformers through LlamaForCausalLM(attn_implementation="sdpa") loading the same GGUF
file. The NLLs are checked to agree before timing; compile time is reported separately; runs alternate so load
from other processes hits both alike; the figure is the median of the timed runs.

  python benchmarks/real_model.py                       # 2048 and 8192 tokens
  python benchmarks/real_model.py --lengths=2048 --runs=1 --finetune_length=0   # evaluation only

Then one fine-tuning step of the same model on --finetune_length tokens of the same text (1 sequence; forward,
backward, clip, AdamW): lrjax's jitted, donated train step (benchmarks/train_throughput.py, configs/pretrain.py's
optimizer and execution choices of the loaded config) vs transformers + torch AdamW on the GGUF-loaded model.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import harness  # noqa: F401  (repository root on sys.path)

PARSER = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
PARSER.add_argument("--lengths", default="2048,8192", help="comma list of window lengths (tokens)")
PARSER.add_argument("--runs", type=int, default=3, help="timed runs of each side (after one warm-up)")
PARSER.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
PARSER.add_argument("--attention", default=None, help="override lrjax's attention implementation")
PARSER.add_argument("--skip_torch", action="store_true")
PARSER.add_argument("--finetune_length", type=int, default=2048, help="tokens of the fine-tuning step (0: skip)")
ARGS = harness.parse_args(PARSER, quick=dict(lengths="512", runs=1, finetune_length=256))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lrjax import perplexity, tokenizers, weights  # noqa: E402

TEXT = "/usr/share/common-licenses/GPL-3"


def tokens_of(length: int) -> np.ndarray:
  tok = tokenizers.load_tokenizer(weights.smollm2_path())
  text = open(TEXT, encoding="utf-8").read() if os.path.exists(TEXT) else harness.__doc__
  ids = tok.encode(text)
  return np.resize(ids, length).astype(np.int32)[None]


def main():
  torch.set_num_threads(ARGS.threads)
  bench = harness.Bench.start("real_model", ARGS)
  path = weights.smollm2_path()
  cfg, params = weights.load(path)
  if ARGS.attention:
    cfg = cfg.replace(attention=ARGS.attention)
  params = jax.device_put(params)
  fn = perplexity.compiled_window_nll(cfg)
  hf_model = None
  if not ARGS.skip_torch:
    import transformers
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), attn_implementation="sdpa",
        torch_dtype=torch.float32).eval()
  for length in (int(n) for n in ARGS.lengths.split(",")):
    tokens_np = tokens_of(length)
    tokens = jnp.asarray(tokens_np)
    rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=length))
    w = jnp.ones((1, length - 1), jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(lambda p, t, r, ww: perplexity.window_nll(cfg, p, t, r, weights=ww)).lower(
        params, tokens, rope, w).compile()
    compile_s = time.perf_counter() - start
    sides = {"lrjax": lambda: float(jax.block_until_ready(compiled(params, tokens, rope, w)[0])[0])}
    if hf_model is not None:
      ids = torch.from_numpy(tokens_np.astype(np.int64))

      def torch_nll():
        with torch.no_grad():
          logits = hf_model(input_ids=ids, use_cache=False).logits[0, :-1]
          return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
      sides["transformers"] = torch_nll
    warm = {k: f() for k, f in sides.items()}
    if "transformers" in warm:
      assert abs(warm["lrjax"] - warm["transformers"]) / abs(warm["transformers"]) < 1e-4, warm
    timings = harness.interleaved(sides, ARGS.runs, warm_up=False)  # warmed up above (the NLLs compared)
    ppl = float(np.exp(warm["lrjax"] / (length - 1)))
    print(f"SmolLM2-135M, 1 x {length} tokens of {os.path.basename(TEXT)}: perplexity {ppl:.3f}; lrjax compile "
          f"{compile_s:.1f} s")
    bench.figure(f"{length}: lrjax compile", compile_s, "s", timed=False, fmt=".1f")
    report_tokens_per_s(bench, f"{length}:", timings, length)
  if ARGS.finetune_length:
    finetune(cfg, params, hf_model, ARGS.finetune_length, bench)
  bench.finish()


def finetune(cfg, params, hf_model, length: int, bench: harness.Bench) -> None:
  """Times one fine-tuning step of each side (after one warm-up step); records tokens/s and their ratio."""
  import train_throughput  # benchmarks/ is on sys.path (this script's directory)
  tokens_np = tokens_of(length + 1)
  sides = {"lrjax": train_throughput.lrjax_runner(cfg, 1, length, params=params, tokens=tokens_np)}
  if hf_model is not None:
    ids = torch.from_numpy(tokens_np.astype(np.int64))
    sides["transformers"] = train_throughput.torch_train_runner(hf_model, ids)
  timings = harness.interleaved({k: functools.partial(run, 1) for k, run in sides.items()}, ARGS.runs,
                                report=lambda line: print("  fine-tuning" + line[1:]))
  print(f"SmolLM2-135M fine-tuning step, 1 x {length} tokens (AdamW, clip 1.0)")
  report_tokens_per_s(bench, f"fine-tuning {length}:", timings, length)


def report_tokens_per_s(bench: harness.Bench, label: str, timings: dict, tokens: int) -> None:
  """Records and prints each side's tokens/s (from its median wall time) and lrjax / transformers."""
  tps = {}
  for k, v in timings.items():
    median = harness.median_timing(v)
    tps[k] = tokens / median.wall_s
    shown = bench.figure(f"{label} {k}", tps[k], "tokens/s", fmt=".0f")
    print(f"  {k:13s} {shown} tokens/s   median {median}")
  if "transformers" in tps:
    ratio = bench.ratio(f"{label} lrjax / transformers", tps["lrjax"] / tps["transformers"])
    print(f"  lrjax / transformers = {ratio}")


if __name__ == "__main__":
  main()
