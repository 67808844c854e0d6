"""Greedy decoding of the real SmolLM2-135M: lrjax (chunked prefill into the KV cache, then cached decoding) vs
transformers `generate` (sdpa, use_cache=True) on the same weights; and the compiled memory of a prefill chunk.

Throughput: a prompt of --prompt_len tokens of real text (GPL-3 as Debian ships it, repeated to length, tokenized
by the model's own tokenizer), float32 on the CPU. Each side generates 1 token (its prefill: prompt tokens per
second) and --new_tokens tokens (decode tokens per second: (new_tokens - 1) / the difference of the two times).
The generated tokens of the two sides must be equal (checked on the warm-up calls, before timing). lrjax's compile
time is the first calls' extra time over the warm calls, reported apart. Runs alternate so load from other
processes hits both alike; the figures are medians.

Memory (compiled only, nothing runs): XLA's memory_analysis of lrjax's prefill step for one --prefill_chunk-token
chunk into a cache of each --memory_lengths slots: peak = arguments + outputs - aliased (the donated cache) +
temporaries, and peak without the cache; then the ratio of the longest to the shortest (target: without the cache,
at most 1.3x for twice the length).

  python benchmarks/decode_throughput.py               # SmolLM2-135M: 4k prompt + 64 tokens; 16k and 32k memory
  python benchmarks/decode_throughput.py --runs=3 --new_tokens=128
  python benchmarks/decode_throughput.py --quick       # smoke run: the built-in byte model at tiny sizes
"""

from __future__ import annotations

import argparse
import os
import sys

import harness  # first: puts the repository root on sys.path

PARSER = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
PARSER.add_argument("--model", default="smollm2", help='"smollm2", "builtin" or a checkpoint transformers reads')
PARSER.add_argument("--prompt_len", type=int, default=4096, help="prompt tokens")
PARSER.add_argument("--new_tokens", type=int, default=64, help="greedy tokens generated")
PARSER.add_argument("--prefill_chunk", type=int, default=2048, help="lrjax prefill chunk (0: one chunk)")
PARSER.add_argument("--memory_lengths", default="16384,32768", help="comma list of cache lengths (slots)")
PARSER.add_argument("--runs", type=int, default=1, help="timed runs of each side (after one warm-up)")
PARSER.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
PARSER.add_argument("--skip_torch", action="store_true")
ARGS = harness.parse_args(PARSER, quick=dict(model="builtin", prompt_len=192, new_tokens=8, prefill_chunk=64,
                                             memory_lengths="512,1024"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lrjax import decode, kv_cache, weights  # noqa: E402

TEXT = "/usr/share/common-licenses/GPL-3"
MIB = 1 << 20


def prompt_tokens(length: int) -> np.ndarray:
  """i32[1, length]: real text through the model's tokenizer, repeated to length."""
  tok = weights.model_tokenizer(ARGS.model)
  text = open(TEXT, encoding="utf-8").read() if os.path.exists(TEXT) else harness.__doc__
  return np.resize(np.asarray(tok.encode(text), np.int32), length)[None]


def transformers_model(path: str):
  import transformers
  kw = dict(attn_implementation="sdpa", dtype=torch.float32)
  if path.endswith(".gguf"):
    kw["gguf_file"], path = os.path.basename(path), os.path.dirname(path)
  return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def step_memory(cfg, params, chunk: int, length: int) -> dict:
  """Compiled memory (bytes) of one prefill step of `chunk` tokens into a cache of `length` slots."""
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  cache = abstract(jax.eval_shape(lambda: kv_cache.init(cfg, 1, length)))
  ints = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays())
  compiled = decode.compiled_step(cfg).lower(abstract(params), ints, ints, rope, cache,
                                             jax.ShapeDtypeStruct((), jnp.int32)).compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
  return {"peak": peak, "temp": m.temp_size_in_bytes, "cache": cache_bytes, "without_cache": peak - cache_bytes}


def main():
  torch.set_num_threads(ARGS.threads)
  bench = harness.Bench.start("decode_throughput", ARGS)
  path = weights.model_path(ARGS.model)
  cfg, params = weights.load(path, dtype="float32")
  cfg = cfg.replace(dtype="float32")
  params = jax.device_put(params)
  prompt = prompt_tokens(ARGS.prompt_len)
  n, t, chunk = ARGS.new_tokens, ARGS.prompt_len, ARGS.prefill_chunk or None
  sides = {"lrjax": lambda k: decode.greedy_generate(cfg, params, prompt, k, prefill_chunk=chunk)}
  if not ARGS.skip_torch:
    hf_model = transformers_model(path)
    ids = torch.from_numpy(prompt.astype(np.int64))

    def hf_generate(k):
      with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                do_sample=False, use_cache=True, pad_token_id=0)
      return out[:, t:].numpy()
    sides["transformers"] = hf_generate
  warm, outputs = {}, {}
  for name, generate in sides.items():  # warm-up: lrjax compiles here
    warm[name] = []
    for k in (1, n):
      with harness.timed() as timing:
        outputs[name] = generate(k)
      warm[name].append(timing.wall_s)
  equal = "transformers" not in outputs or np.array_equal(outputs["lrjax"], outputs["transformers"])
  if not equal:
    first = int(np.argmax(outputs["lrjax"][0] != outputs["transformers"][0]))
    print(f"generated tokens differ from token {first}: lrjax {outputs['lrjax'][0].tolist()}, transformers "
          f"{outputs['transformers'][0].tolist()}")
  timings = {name: {1: [], n: []} for name in sides}
  for _ in range(ARGS.runs):
    for name, generate in sides.items():
      for k in (1, n):
        with harness.timed() as timing:
          generate(k)
        timings[name][k].append(timing)
  print(f"{ARGS.model}, 1 x {t} prompt tokens of {os.path.basename(TEXT)} + {n} greedy tokens, lrjax prefill chunk "
        f"{chunk or 'one'}:")
  tps = {}
  for name in sides:
    one, many = (harness.median_timing(timings[name][k]) for k in (1, n))
    tps[name] = (t / one.wall_s, (n - 1) / max(many.wall_s - one.wall_s, 1e-9))
    prefill = bench.figure(f"{name} prefill", tps[name][0], "tokens/s", fmt=".0f")
    step = bench.figure(f"{name} decode", tps[name][1], "tokens/s", fmt=".2f")
    print(f"  {name:13s} prefill {prefill} tokens/s ({one}), decode {step} tokens/s ({n} tokens: {many})")
  compile_s = sum(w - harness.median_timing(timings["lrjax"][k]).wall_s for w, k in zip(warm["lrjax"], (1, n)))
  print(f"  lrjax compile (first calls' extra time) {bench.figure('lrjax compile', compile_s, 's', fmt='.1f')} s")
  if "transformers" in tps:
    bench.figure("generated tokens equal", "yes" if equal else "NO", timed=False)
    for i, what in enumerate(("prefill", "decode")):
      print(f"  lrjax / transformers {what}: "
            f"{bench.ratio(f'{what}: lrjax / transformers', tps['lrjax'][i] / tps['transformers'][i])}")
  lengths = [int(s) for s in ARGS.memory_lengths.split(",")]
  mem_chunk = chunk or 2048
  memory = {s: step_memory(cfg, params, mem_chunk, s) for s in lengths}
  for s, m in memory.items():
    print(f"  prefill step, {mem_chunk}-token chunk into a {s}-slot cache: peak {m['peak'] / MIB:.1f} MiB "
          f"(cache {m['cache'] / MIB:.1f}, temporaries {m['temp'] / MIB:.1f}, without the cache "
          f"{m['without_cache'] / MIB:.1f})")
    bench.figure(f"memory {s} slots: peak", m["peak"] / MIB, "MiB", timed=False, fmt=".1f")
    bench.figure(f"memory {s} slots: cache", m["cache"] / MIB, "MiB", timed=False, fmt=".1f")
    bench.figure(f"memory {s} slots: temporaries", m["temp"] / MIB, "MiB", timed=False, fmt=".1f")
  lo, hi = memory[min(lengths)], memory[max(lengths)]
  for key, what in (("without_cache", "peak without the cache"), ("peak", "peak"), ("temp", "temporaries")):
    print(f"  {what}, {max(lengths)} vs {min(lengths)} slots: "
          f"{bench.ratio(f'memory {what}: {max(lengths)} / {min(lengths)}', hi[key] / lo[key], timed=False)}")
  bench.finish()
  if not equal:
    sys.exit("lrjax and transformers generated different tokens")


if __name__ == "__main__":
  main()
