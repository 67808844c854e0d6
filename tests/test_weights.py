"""Checkpoint conversion both ways, against transformers (HF) and a Meta-format reference written here."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lrjax import model, rope, weights

LOGITS = jax.jit(model.logits, static_argnums=0)
HF_KW = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
             initializer_range=0.1)


def _hf_model(**overrides):
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **overrides})).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return m


def _tokens(t, seed=0):
  return np.random.RandomState(seed).randint(0, 64, (2, t)).astype(np.int32)


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def _ours(cfg, params, tokens, scaling=None):
  t = tokens.shape[1]
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
  arrays = jax.tree.map(jnp.asarray, cfg.rope_arrays(scaling, seq_len=t))
  static = cfg.replace(rope_scaling=rope.RopeScaling(), param_dtype="float32")
  return np.asarray(LOGITS(static, params, jnp.asarray(tokens), jnp.asarray(positions), arrays))


def _assert_params_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf")
  m = _hf_model()
  m.save_pretrained(directory)
  return directory, m


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return weights.load_hf(hf_dir[0])


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value), str(excinfo.value)


# ------------------------------------------------------------------------------------------------------------
# HF out.


@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_hf_then_transformers_gives_same_logits(tmp_path, hf_dir, loaded, shard):
  cfg, params = loaded
  weights.save_hf(tmp_path / "out", cfg, params, max_shard_bytes=shard)
  if shard:
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = list(index["weight_map"].values())
    assert len(set(files)) > 3
    for f in set(files):  # at most max_shard_bytes of data, or a single bigger tensor
      assert (tmp_path / "out" / f).stat().st_size <= shard + 1000 or files.count(f) == 1
  m2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = _tokens(20)
  np.testing.assert_array_equal(_hf_logits(m2, tokens), _hf_logits(hf_dir[1], tokens))  # lossless in f32
  cfg2, params2 = weights.load_hf(tmp_path / "out")
  assert cfg2 == cfg
  _assert_params_equal(params2, params)


def test_save_hf_tied_and_bf16(tmp_path):
  m = _hf_model(tie_word_embeddings=True)
  m.save_pretrained(tmp_path / "src")
  cfg, params = weights.load_hf(tmp_path / "src")
  weights.save_hf(tmp_path / "out", cfg, params, dtype="bfloat16")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16"
  cfg2, params2 = weights.load_hf(tmp_path / "out")
  assert cfg2.param_dtype == "bfloat16" and "lm_head" not in params2
  _assert_params_equal(params2, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
  m2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
  tokens = _tokens(16)
  ref = _hf_logits(m, tokens)
  assert np.abs(_hf_logits(m2, tokens) - ref).max() < 0.03 * np.abs(ref).max()


def test_exported_longrope_is_reproduced_by_transformers(tmp_path, loaded):
  """Our long-factor (and short-factor) logits are what transformers computes from the exported config.json."""
  cfg, params = loaded
  long = [1.0, 1.3, 2.0, 2.2, 5.0, 6.0, 7.5, 8.0]  # not monotone on purpose
  short = [1.0, 1.0, 1.1, 1.2, 1.2, 1.4, 1.5, 1.5]
  # s = max_position_embeddings / original, as transformers derives it (and lrjax states it).
  scaling = rope.RopeScaling(method="longrope", factor=cfg.max_position_embeddings / 16,
                             original_max_position_embeddings=16, long_factor=long, short_factor=short)
  weights.save_hf(tmp_path / "out", cfg, params, rope_scaling=scaling)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["rope_scaling"]["rope_type"] == config["rope_parameters"]["rope_type"] == "longrope"
  assert config["original_max_position_embeddings"] == 16
  m2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  for t in (16, 40):  # at the original length: short factors; beyond: long
    tokens = _tokens(t, seed=t)
    ours = _ours(cfg, params, tokens, scaling)
    np.testing.assert_allclose(ours, _hf_logits(m2, tokens), atol=1e-4, err_msg=f"{t} tokens")
    assert not np.allclose(ours, _ours(cfg, params, tokens), atol=1e-3)  # scaling changes the logits
  cfg2, _ = weights.load_hf(tmp_path / "out")
  assert cfg2.rope_scaling.long_factor == tuple(long) and cfg2.rope_scaling.short_factor == tuple(short)


def test_export_refuses_what_hf_cannot_express(tmp_path, loaded):
  cfg, params = loaded
  n_hat = rope.RopeScaling(method="longrope", factor=4.0, long_factor=[2.0] * 8, original_max_position_embeddings=16,
                           n_hat=4)
  with pytest.raises(weights.WeightsError, match=r"n_hat=4 cannot be expressed in an HF config") as e:
    weights.save_hf(tmp_path / "out", cfg, params, rope_scaling=n_hat)
  _one_line(e)
  assert not (tmp_path / "out").exists()
  weights.save_hf(tmp_path / "out", cfg, params, rope_scaling=n_hat, allow_dropping_n_hat=True)
  table = n_hat.replace(long_factor=np.full((2, 8), 2.0), n_hat=0)
  with pytest.raises(weights.WeightsError, match=r"per-layer long_factor tables cannot be expressed"):
    weights.save_hf(tmp_path / "out2", cfg, params, rope_scaling=table)
  with pytest.raises(weights.WeightsError, match=r"long_factor has 4 factors but rotary_dim/2 = 8"):
    weights.save_hf(tmp_path / "out3", cfg, params, rope_scaling=n_hat.replace(long_factor=[2.0] * 4, n_hat=0))


def test_existing_destination_is_never_damaged(tmp_path, loaded):
  cfg, params = loaded
  dest = tmp_path / "dest"
  dest.mkdir()
  (dest / "keep.txt").write_text("precious")
  with pytest.raises(weights.WeightsError, match=r"dest exists and is not empty \(pass overwrite=True") as e:
    weights.save_hf(dest, cfg, params)
  _one_line(e)
  # a failure in the middle of writing (a missing extra file) with overwrite=True leaves it as it was
  with pytest.raises(weights.WeightsError, match=r"nope.json: cannot copy"):
    weights.save_hf(dest, cfg, params, overwrite=True, extra_files={"tokenizer.json": str(tmp_path / "nope.json")})
  bad = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "up"}}
  with pytest.raises(weights.WeightsError, match=r"params do not match the config: missing \['layers/up'\]"):
    weights.save_hf(dest, cfg, bad, overwrite=True)
  with pytest.raises(weights.WeightsError, match=r"unsupported dtype 'int8'"):
    weights.save_hf(dest, cfg, params, overwrite=True, dtype="int8")
  assert sorted(os.listdir(dest)) == ["keep.txt"] and (dest / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["dest"]  # no temp directories left behind
  (tmp_path / "tok.json").write_text("{}")
  weights.save_hf(dest, cfg, params, overwrite=True, extra_files={"tokenizer.json": str(tmp_path / "tok.json")})
  assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors", "tokenizer.json"]
  empty = tmp_path / "empty"
  empty.mkdir()
  weights.save_hf(empty, cfg, params)  # an empty directory is fine without overwrite
  assert sorted(os.listdir(tmp_path)) == ["dest", "empty", "tok.json"]


# ------------------------------------------------------------------------------------------------------------
# HF in: bad checkpoints.


def _copy_hf(hf_dir, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(hf_dir[0], dst)
  return dst


def _edit_tensors(directory, edit):
  from safetensors.numpy import load_file, save_file
  path = directory / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, **changes):
  config = json.loads((directory / "config.json").read_text())
  config.update(changes)
  (directory / "config.json").write_text(json.dumps(config))


def _expect(directory, match):
  with pytest.raises(weights.WeightsError, match=match) as e:
    weights.load(directory)
  _one_line(e)


def test_missing_extra_and_misshapen_tensors(tmp_path, hf_dir):
  d = _copy_hf(hf_dir, tmp_path)
  _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  _expect(d, r"model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight")
  d = _copy_hf(hf_dir, tmp_path / "b")
  _edit_tensors(d, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  _expect(d, r"model.safetensors: unexpected tensor model.extra.weight")
  d = _copy_hf(hf_dir, tmp_path / "c")
  _edit_config(d, intermediate_size=128)
  _expect(d, r"tensor model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), config expects \(128, 64\)")
  d = _copy_hf(hf_dir, tmp_path / "d")  # old checkpoints' rotary buffers are skipped
  _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
  weights.load(d)


def test_corrupt_files_and_configs(tmp_path, hf_dir):
  d = _copy_hf(hf_dir, tmp_path)
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])
  _expect(d, r"model.safetensors: corrupt safetensors file")
  (d / "model.safetensors").write_bytes(b"\xff" * 64)
  _expect(d, r"model.safetensors: corrupt safetensors file")
  d = _copy_hf(hf_dir, tmp_path / "b")
  (d / "config.json").write_text("{\"hidden_size\": 64,")
  _expect(d, r"config.json: malformed config.json")
  for changes, match in [
      (dict(architectures=["GPT2LMHeadModel"]), r"unsupported architecture GPT2LMHeadModel"),
      (dict(attention_bias=True), r"unsupported attention_bias=true"),
      (dict(mlp_bias=True), r"unsupported mlp_bias=true"),
      (dict(hidden_act="gelu"), r"unsupported hidden_act 'gelu'"),
      (dict(num_hidden_layers=None), r"missing integer field\(s\) num_hidden_layers"),
      (dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}), r"unsupported rope type 'mrope'"),
      (dict(num_key_value_heads=3), r"num_heads 4 is not a multiple of num_kv_heads 3"),
  ]:
    d2 = _copy_hf(hf_dir, tmp_path / f"c{len(changes)}{abs(hash(match)) % 10**6}")
    _edit_config(d2, **changes)
    _expect(d2, r"config.json: .*" + match)
  os.remove(d / "model.safetensors")
  (d / "config.json").write_text(json.dumps(json.loads((hf_dir[0] / "config.json").read_text())))
  _expect(d, r"no weights found")
  _expect(tmp_path / "nowhere", r"nowhere: not a directory")
  (tmp_path / "empty").mkdir()
  _expect(tmp_path / "empty", r"empty: not a checkpoint directory")


def test_sharded_index_problems(tmp_path):
  m = _hf_model()
  m.save_pretrained(tmp_path / "s", max_shard_size="20KB")
  cfg, params = weights.load(tmp_path / "s")
  tokens = _tokens(12)
  np.testing.assert_allclose(_ours(cfg, params, tokens), _hf_logits(m, tokens), atol=1e-4)
  shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[3]
  os.remove(shard)
  _expect(tmp_path / "s", rf"{shard.name}: missing weights file")


def test_torch_bin_checkpoints(tmp_path, hf_dir, monkeypatch):
  d = tmp_path / "bin"
  d.mkdir()
  shutil.copy(hf_dir[0] / "config.json", d)
  torch.save(hf_dir[1].state_dict(), d / "pytorch_model.bin")
  cfg, params = weights.load(d)
  _assert_params_equal(params, weights.load(hf_dir[0])[1])
  with monkeypatch.context() as m:
    m.setitem(__import__("sys").modules, "torch", None)  # as if torch were not installed
    _expect(d, r"reading or writing torch checkpoints \(.bin/.pth\) needs torch")

  class Evil:
    def __reduce__(self):
      return (print, ("pickled code ran",))

  torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
  _expect(d, r"pytorch_model.bin: cannot load with torch.load\(weights_only=True\)")


# ------------------------------------------------------------------------------------------------------------
# Meta.


def _meta_from_hf(m, directory, n_shards=1):
  """Meta consolidated.*.pth + params.json from an HF model: undo the HF q/k permutation (written here, from the
  published description: Meta pairs dims (2j, 2j+1), HF pairs (j, j+h/2)), split for model parallelism."""
  c = m.config
  h = c.head_dim

  def unpermute(w, heads):  # HF half-split rows -> Meta interleaved rows, per head
    out = torch.empty_like(w)
    for head in range(heads):
      for j in range(h // 2):
        out[head * h + 2 * j] = w[head * h + j]
        out[head * h + 2 * j + 1] = w[head * h + h // 2 + j]
    return out

  sd = {k: v.clone() for k, v in m.state_dict().items()}
  full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
          "output.weight": sd["lm_head.weight"], "rope.freqs": torch.ones(h // 2)}
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    full.update({
        f"layers.{i}.attention.wq.weight": unpermute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
        f"layers.{i}.attention.wk.weight": unpermute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
        f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
        f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
        f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
        f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
        f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
        f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
        f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]})
  # Llama 2's model-parallel layout: column-parallel (wq wk wv w1 w3 output) split rows, row-parallel (wo w2)
  # and the embedding split columns, norms replicated.
  def axis(name):
    if any(k in name for k in ("wq", "wk", "wv", "w1", "w3", "output")):
      return 0
    if any(k in name for k in ("wo", "w2", "tok_embeddings")):
      return 1
    return None

  directory.mkdir()
  for s in range(n_shards):
    part = {k: (v if axis(k) is None else v.chunk(n_shards, axis(k))[s].clone()) for k, v in full.items()}
    torch.save(part, directory / f"consolidated.{s:02d}.pth")
  # Meta's width rule: int(8·64/3) = 170 -> int(0.5 · 170) = 85 -> next multiple of 32 = 96
  (directory / "params.json").write_text(json.dumps({
      "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
      "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "multiple_of": 32, "ffn_dim_multiplier": 0.5,
      "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"]}))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_from_hf_gives_hf_logits(tmp_path, hf_dir, n_shards):
  m = hf_dir[1]
  _meta_from_hf(m, tmp_path / "meta", n_shards)
  cfg, params = weights.load(tmp_path / "meta")
  assert (cfg.intermediate_size, cfg.num_kv_heads, cfg.vocab_size) == (96, 2, 64)
  tokens = _tokens(20)
  np.testing.assert_allclose(_ours(cfg, params, tokens), _hf_logits(m, tokens), atol=1e-4)
  _assert_params_equal(params, weights.load(hf_dir[0])[1])


def test_meta_round_trip(tmp_path, loaded):
  cfg, params = loaded
  weights.save_meta(tmp_path / "meta", cfg, params, dtype="float32")
  cfg2, params2 = weights.load_meta(tmp_path / "meta")
  _assert_params_equal(params2, params)
  assert cfg2.replace(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id) == cfg
  llama3 = cfg.replace(rope_scaling=rope.RopeScaling(method="llama3", factor=8.0,
                                                     original_max_position_embeddings=8192))
  weights.save_meta(tmp_path / "meta3", llama3, params)
  cfg3, params3 = weights.load_meta(tmp_path / "meta3")
  assert cfg3.rope_scaling == llama3.rope_scaling and cfg3.param_dtype == "bfloat16"
  with pytest.raises(weights.WeightsError, match=r"Meta params.json cannot express longrope rope scaling"):
    weights.save_meta(tmp_path / "meta4", cfg.replace(rope_scaling=rope.RopeScaling(
        method="longrope", long_factor=[2.0] * 8)), params)


def test_meta_bad_inputs(tmp_path, hf_dir):
  _meta_from_hf(hf_dir[1], tmp_path / "meta", 2)
  p = json.loads((tmp_path / "meta" / "params.json").read_text())
  (tmp_path / "meta" / "params.json").write_text(json.dumps({**p, "ffn_dim_multiplier": 1.0}))
  _expect(tmp_path / "meta", r"feed_forward.w1 has 96 rows but params.json's multiple_of/ffn_dim_multiplier give "
                             r"intermediate size 192")
  (tmp_path / "meta" / "params.json").write_text(json.dumps(p))
  shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
  shard.pop("layers.0.attention.wq.weight")
  torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
  _expect(tmp_path / "meta", r"consolidated.01.pth: tensor names differ from .*consolidated.00.pth")


# ------------------------------------------------------------------------------------------------------------
# Native.


def test_native_round_trip(tmp_path, loaded):
  cfg, params = loaded
  scaling = rope.RopeScaling(method="longrope", factor=8.0, original_max_position_embeddings=16,
                             long_factor=np.linspace(1, 8, 8), short_factor=[1.0] * 8, n_hat=4,
                             buckets=((32, [1.5] * 8),), temperature=1.1)
  cfg = cfg.replace(rope_scaling=scaling, eos_token_id=(2, 3), attention="reference", remat="full")
  weights.save_native(tmp_path / "native", cfg, jax.tree.map(jnp.asarray, params))
  cfg2, params2 = weights.load(tmp_path / "native")
  assert cfg2 == cfg
  _assert_params_equal(params2, params)
  assert isinstance(params2["embed"], np.ndarray)
  cfg3, params3 = weights.load(tmp_path / "native", dtype="bfloat16")
  assert cfg3.param_dtype == "bfloat16" and params3["layers"]["q"].dtype == jnp.bfloat16
  doc = json.loads((tmp_path / "native" / "lrjax_config.json").read_text())
  (tmp_path / "native" / "lrjax_config.json").write_text(json.dumps({**doc, "config": {**doc["config"],
                                                                                      "n_layers": 3}}))
  _expect(tmp_path / "native", r"lrjax_config.json: unknown config keys n_layers")


# ------------------------------------------------------------------------------------------------------------
# Conversion (library and script).


def test_convert_chain_preserves_logits(tmp_path, hf_dir):
  """HF -> Meta -> native -> HF gives the source model's logits back in transformers."""
  tokens = _tokens(12)
  line = weights.convert(hf_dir[0], tmp_path / "meta", format="meta", dtype="float32")
  assert "-> " in line and "(meta, float32" in line and "\n" not in line
  weights.convert(tmp_path / "meta", tmp_path / "native", format="native")
  weights.convert(tmp_path / "native", tmp_path / "hf", format="hf", max_shard_bytes=30_000)
  m2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  np.testing.assert_allclose(_hf_logits(m2, tokens), _hf_logits(hf_dir[1], tokens), atol=1e-5)
  for kwargs, match in [(dict(format="gguf"), r"unknown destination format 'gguf'"),
                        (dict(format="meta", max_shard_bytes=10), r"max_shard_bytes applies to format=hf only"),
                        (dict(target_length=128), r"target_length applies only together with a scaling"),
                        (dict(target_length=128, scaling=rope.RopeScaling(method="dynamic", factor=2.0)),
                         r"dynamic NTK reads max_position_embeddings as the original length")]:
    with pytest.raises(weights.WeightsError, match=match):
      weights.convert(hf_dir[0], tmp_path / "x", **kwargs)


def test_convert_script_writes_factor_file_scaling(tmp_path, hf_dir):
  """The experiment end to end: official CSV factors + target length -> an HF config transformers follows."""
  import subprocess
  import sys
  from lrjax import factors
  long = np.array([1.0, 1.5, 1.5, 3.0, 4.0, 6.0, 7.0, 8.0])
  factors.save_csv(tmp_path / "result_final.csv", long)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "experiments", "convert.py"),
         f"--config={os.path.join(root, 'configs', 'convert.py')}", f"--config.source={hf_dir[0]}",
         f"--config.dest={tmp_path / 'out'}", f"--config.factors={tmp_path / 'result_final.csv'}",
         "--config.target_length=512", "--config.original_length=32"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.count("\n") == 1 and "rope longrope s=16" in done.stdout
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["max_position_embeddings"] == 512 and config["original_max_position_embeddings"] == 32
  cfg, params = weights.load(tmp_path / "out")
  m2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = _tokens(40)  # beyond 32: long factors, attention factor sqrt(1 + ln 16 / ln 32)
  np.testing.assert_allclose(_ours(cfg, params, tokens), _hf_logits(m2, tokens), atol=1e-4)
  scaling = rope.RopeScaling(method="longrope", factor=16.0, original_max_position_embeddings=32, long_factor=long)
  np.testing.assert_allclose(_ours(cfg, params, tokens), _ours(cfg, params, tokens, scaling), atol=1e-6)
  before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and done.stdout == ""
  assert done.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'out'} exists and is not empty (pass overwrite=True to replace it)"]
  assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
  with pytest.raises(weights.WeightsError, match=r"factors: this longrope setting has no extension ratio s = "
                                                 r"target length / original window"):
    weights.convert(hf_dir[0], tmp_path / "out2", scaling=factors.load(tmp_path / "result_final.csv"))
