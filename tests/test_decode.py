"""KV-cache greedy decoding equals full recomputation, and never mixes two factor sets in one cache; chunked and
sequence-parallel prefill equal the one-shot forward, in memory linear in the cache, without gathering it."""

import contextlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import decode
from lrjax import kv_cache
from lrjax import model as M
from lrjax import rope as R
from lrjax import sharding as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = M.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=256, block_q=16, block_k=16)
SCALING = R.RopeScaling("longrope", factor=4.0, original_max_position_embeddings=64,
                        long_factor=np.linspace(1, 4, 8), short_factor=np.linspace(1, 1.5, 8))


@pytest.fixture(scope="module")
def params():
  p = M.init_params(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda a: a * 3 if a.ndim > 1 else a, p)  # sharper distributions: fewer argmax ties


@jax.jit
def _last_logits(params, seq, length, rope):
  """Logits at position length-1 of a right-padded sequence (causal: padding after it changes nothing)."""
  pos = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
  return jax.lax.dynamic_index_in_dim(M.logits(CFG, params, seq, pos, rope), length - 1, 1, False)


def _recompute(params, prompt, n, set_length):
  """Greedy decoding by full forward passes; set_length(current_len) picks the factor set each step."""
  seq, out = prompt, []
  for _ in range(n):
    length = seq.shape[1]
    rope = jax.tree.map(jnp.asarray, CFG.rope_arrays(SCALING, seq_len=set_length(length)))
    padded = np.pad(seq, ((0, 0), (0, 96 - length)))
    tok = np.asarray(jnp.argmax(_last_logits(params, jnp.asarray(padded), length, rope), -1))
    out.append(tok)
    seq = np.concatenate([seq, tok[:, None]], 1)
  return np.stack(out, 1)


def _mesh(**sizes):
  return S.make_mesh(sizes, devices=jax.devices()[:int(np.prod(list(sizes.values())))])


# How the cache is built (greedy_generate's keyword arguments): one chunk or chunks of 16 on one device; the
# sequence split over 4 devices (ring prefill, decoding from the sharded cache), with batch rows over data and
# chunks of 16 (4 tokens per device and chunk), or heads over tensor.
EXECUTIONS = {"one_chunk": {}, "chunks": dict(prefill_chunk=16), "sequence4": dict(mesh=dict(sequence=4)),
              "data2_sequence4_chunks": dict(mesh=dict(data=2, sequence=4), prefill_chunk=16),
              "data2_sequence2_tensor2": dict(mesh=dict(data=2, sequence=2, tensor=2))}


def _execution(name):
  kw = dict(EXECUTIONS[name])
  if "mesh" in kw:
    kw["mesh"] = _mesh(**kw["mesh"])
  return kw


@pytest.mark.parametrize("execution", list(EXECUTIONS))
def test_cache_equals_recompute_total_length_policy(params, execution):
  prompt = np.random.RandomState(0).randint(0, 64, (2, 50))
  got = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, pad_multiple=16, **_execution(execution))
  np.testing.assert_array_equal(got, _recompute(params, prompt, 30, lambda _: 80))


@pytest.mark.parametrize("execution", ["one_chunk", "chunks", "data2_sequence4_chunks"])
def test_reprefill_crosses_switch_without_mixing(params, execution):
  """Crossing original_max_position_embeddings (64) mid-generation: the cache is rebuilt with long factors, by
  the same chunked / sharded prefill."""
  prompt = np.random.RandomState(1).randint(0, 64, (2, 50))
  kw = _execution(execution)
  got = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, policy="reprefill", pad_multiple=16, **kw)
  # transformers' rule: the set follows the current length (short while <= 64, long after).
  np.testing.assert_array_equal(got, _recompute(params, prompt, 30, lambda n: n))
  static = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, pad_multiple=16, **kw)
  assert not np.array_equal(got, static), "the switch should change the continuation"


def _chunk_by_chunk_logits(cfg, params, prompt, rope, chunk, mesh):
  """Logits f32[b, t, V] of every prompt position, through the model's cache path chunk by chunk, in the slots
  decode.layout gives (each shard's piece of a chunk at its local offset)."""
  b, t = prompt.shape
  lay = decode.layout(t, 0, chunk=chunk, pad_multiple=chunk, shards=decode.num_shards(cfg, mesh),
                      block_k=cfg.block_k)
  pad = lay.padded - t
  tokens = np.pad(prompt, ((0, 0), (pad, 0))).astype(np.int32)
  positions = np.concatenate([np.full((b, pad), decode.EMPTY_POSITION),
                              np.broadcast_to(np.arange(t), (b, t))], 1).astype(np.int32)

  @jax.jit
  def step(tokens, positions, cache, index):
    hidden, cache = M.Llama(cfg).apply({"params": params}, tokens, positions, rope, cache, index)
    return jnp.einsum("btd,dv->btv", hidden, M.head_weights(cfg, params)), cache

  cache, out = decode.init_cache(cfg, b, lay.length, mesh=mesh), []
  with S.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
    for i in range(lay.padded // chunk):
      part = slice(i * chunk, (i + 1) * chunk)
      logits, cache = step(tokens[:, part], positions[:, part], cache, jnp.int32(lay.chunk_index(i)))
      out.append(np.asarray(logits))
  return np.concatenate(out, 1)[:, pad:]


PREFILL_CASES = [  # (mesh sizes, chunk, sliding window)
    (None, 16, None), (None, 16, 8), (dict(sequence=4), 16, None), (dict(sequence=8), 64, 8),
    (dict(data=2, sequence=2, tensor=2), 16, None)]


@pytest.mark.parametrize("sizes, chunk, window", PREFILL_CASES)
def test_chunked_and_sharded_prefill_equal_the_one_shot_forward(params, sizes, chunk, window):
  """Every position of a 50-token prompt (left-padded to whole chunks), and prefill's last logits and token,
  against the materialised one-shot forward; a sliding window shorter than a chunk crosses chunk boundaries."""
  cfg = CFG.replace(sliding_window=window)
  mesh = None if sizes is None else _mesh(**sizes)
  prompt = np.random.RandomState(3).randint(0, 64, (2, 50))
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(SCALING, seq_len=80))
  ref = np.asarray(M.logits(cfg.replace(attention="reference"), params, jnp.asarray(prompt),
                            jnp.broadcast_to(jnp.arange(50), (2, 50)), rope))
  atol = 1e-5 * np.abs(ref).max()  # fp32 noise; a wrong mask or slot moves logits by ~0.1
  got = _chunk_by_chunk_logits(decode.execution_config(cfg, mesh), params, prompt, rope, chunk, mesh)
  np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
  pre = decode.prefill(cfg, params, prompt, rope, new_tokens=4, chunk=chunk, mesh=mesh)
  np.testing.assert_allclose(np.asarray(pre.logits), ref[:, -1], atol=atol, rtol=0)
  np.testing.assert_array_equal(np.asarray(pre.token)[:, 0], ref[:, -1].argmax(-1))
  if mesh is not None:  # the cache is split along its slots over the sequence axis
    assert pre.cache["k"].sharding.spec[2] == "sequence"


def _step_memory(cfg, chunk, length, mesh=None):
  """memory_analysis of the compiled cache step (t = chunk tokens, a cache of `length` slots), lowered on
  abstract arrays (nothing is allocated)."""
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  params = abstract(jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0))))
  cache = abstract(jax.eval_shape(lambda: kv_cache.init(cfg, 1, length)))
  ints = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays())
  lowered = decode.compiled_step(cfg, mesh).lower(params, ints, ints, rope, cache, jax.ShapeDtypeStruct((), jnp.int32))
  return lowered.compile()


MEM_CFG = CFG.replace(num_layers=4, max_position_embeddings=8192, block_q=64, block_k=64)


def test_prefill_chunk_memory_is_linear_in_the_cache_and_holds_one_layer_of_it():
  """Temporaries of a 128-token chunk step grow linearly with the cache, by at most one layer's slots (the
  kernel's operands): not a second copy of the cache (4 layers) nor [chunk, S] scores (4 heads x 128 f32)."""
  temp = {s: _step_memory(MEM_CFG, 128, s).memory_analysis().temp_size_in_bytes for s in (1024, 2048, 4096)}
  one_layer_slot = 2 * MEM_CFG.num_kv_heads * MEM_CFG.head_dim * 4 + 4  # k, v f32 and a position, per slot
  slopes = [(temp[2048] - temp[1024]) / 1024, (temp[4096] - temp[2048]) / 2048]
  assert all(0 < s <= 1.25 * one_layer_slot for s in slopes), (temp, one_layer_slot)
  assert 2 * MEM_CFG.num_kv_heads * MEM_CFG.head_dim * 4 * MEM_CFG.num_layers > 3 * one_layer_slot  # (a copy)
  assert MEM_CFG.num_heads * 128 * 4 > 3 * one_layer_slot  # ([chunk, S] scores would show)


def test_one_chunk_prefill_memory_is_linear_in_the_prompt():
  """No [t, t] array: temporaries of a one-chunk prefill of t tokens grow linearly (doubling t adds twice as
  much as the previous doubling did, where [t, t] f32 scores would add four times as much)."""
  temp = {t: _step_memory(MEM_CFG, t, t).memory_analysis().temp_size_in_bytes for t in (512, 1024, 2048)}
  growth = (temp[2048] - temp[1024]) / (temp[1024] - temp[512])
  assert 1.5 < growth < 2.5, temp
  assert temp[2048] < 2048 * 2048 * 4 / 4, temp  # well under one head's [t, t] f32 scores


def test_sharded_decoding_step_never_gathers_the_cache():
  """The compiled decoding step (one replicated token) on a sequence=8 mesh: each device holds 1/8 of the
  cache and the only collectives are the log-sum-exp reductions of [b, 1, N(, H)] partial results."""
  cfg, length = decode.execution_config(MEM_CFG, _mesh(sequence=8)), 4096
  compiled = _step_memory(cfg, 1, length, _mesh(sequence=8))
  text = compiled.as_text()
  assert not re.search(r"all-gather|all-to-all|collective-permute", text)
  reduced = [shape for op in re.findall(r"= (\(?[^=]*?\)?) all-reduce\(", text)
             for shape in re.findall(r"\[([\d,]*)\]", op)]
  assert reduced and all(np.prod([int(d) for d in shape.split(",") if d]) <= cfg.num_heads * cfg.head_dim
                         for shape in reduced), reduced
  cache_bytes = cfg.num_layers * length * (2 * cfg.num_kv_heads * cfg.head_dim * 4 + 4)
  params_bytes = 4 * sum(np.prod(a.shape) for a in jax.tree.leaves(jax.eval_shape(
      lambda: M.init_params(cfg, jax.random.PRNGKey(0)))))
  assert compiled.memory_analysis().argument_size_in_bytes < params_bytes + cache_bytes / 8 + (1 << 16)


def test_bad_decoding_arguments(params):
  prompt = np.zeros((2, 20), np.int32)
  with pytest.raises(decode.DecodeError, match="prefill_chunk must be a positive multiple of the sequence axis "
                                               "size 4, got 6"):
    decode.greedy_generate(CFG, params, prompt, 2, prefill_chunk=6, mesh=_mesh(sequence=4))
  with pytest.raises(decode.DecodeError, match="prefill_chunk must be a positive multiple"):
    decode.greedy_generate(CFG, params, prompt, 2, prefill_chunk=0)
  with pytest.raises(decode.DecodeError, match="prompt must be i32\\[b, t\\] with t >= 1"):
    decode.greedy_generate(CFG, params, np.zeros((2, 0), np.int32), 2)
  with pytest.raises(S.ShardingError, match="batch 2 is not divisible by data\\*fsdp = 4"):
    decode.greedy_generate(CFG, params, prompt, 2, mesh=_mesh(data=4, sequence=2))


@pytest.fixture(scope="module")
def hf_model(params, tmp_path_factory):
  """The same weights and longrope setting in transformers' LlamaForCausalLM (an independent implementation)."""
  import transformers
  from lrjax import weights
  path = tmp_path_factory.mktemp("decode") / "hf"
  weights.save_hf(path, CFG, jax.tree.map(np.asarray, params), rope_scaling=SCALING)
  return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _hf_generate(model, prompt, n, *, use_cache):
  import torch
  with torch.no_grad():
    ids = torch.as_tensor(prompt)
    # An explicit mask: generate would otherwise infer one from pad_token_id and mask every 0 in the prompt.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, use_cache=use_cache, pad_token_id=0)
  return out[:, prompt.shape[1]:].numpy()


@pytest.mark.parametrize("prompt_len, new", [(20, 12), (50, 30), (80, 12)])
def test_reprefill_equals_transformers_generate(params, hf_model, prompt_len, new):
  """Short factors within the window (20 + 12), crossing it (50 + 30 > 64), long beyond it (80 + 12):
  transformers picks the set from the current length at every step; without a cache that never mixes two sets,
  which is exactly the reprefill policy (a cache rebuilt at the switch)."""
  prompt = np.random.RandomState(prompt_len).randint(0, 64, (2, prompt_len))
  got = decode.greedy_generate(CFG, params, prompt, new, scaling=SCALING, policy="reprefill", pad_multiple=16)
  np.testing.assert_array_equal(got, _hf_generate(hf_model, prompt, new, use_cache=False))


def test_total_length_equals_transformers_cached_generate_with_the_final_set(params, hf_model, tmp_path):
  """The default policy binds the set chosen by the final length (long here: 50 + 30 > 64) to the whole
  sequence; transformers' cached generate with that set on both sides of its switch decodes the same."""
  import transformers
  from lrjax import weights
  long_only = SCALING.replace(short_factor=SCALING.long_factor)
  weights.save_hf(tmp_path / "long", CFG, jax.tree.map(np.asarray, params), rope_scaling=long_only)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "long", attn_implementation="eager").eval()
  prompt = np.random.RandomState(7).randint(0, 64, (2, 50))
  got = decode.greedy_generate(CFG, params, prompt, 30, scaling=SCALING, pad_multiple=16)
  np.testing.assert_array_equal(got, _hf_generate(model, prompt, 30, use_cache=True))


def test_unknown_policy(params):
  with pytest.raises(decode.DecodeError, match="unknown decoding policy"):
    decode.greedy_generate(CFG, params, np.zeros((1, 4), np.int32), 2, policy="sometimes")


def test_decode_benchmark_smoke():
  """benchmarks/decode_throughput.py --quick (the built-in model at tiny sizes) runs, both sides generate the
  same tokens, and the memory rows are there."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "benchmarks/decode_throughput.py", "--quick", "--allow_noisy"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "| generated tokens equal | yes |" in proc.stdout
  assert re.search(r"\| memory peak without the cache: 1024 / 512 \| [\d.]+x \| ratio \|", proc.stdout), proc.stdout
