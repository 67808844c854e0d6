"""Factor files (JSON, official CSV) and the HF rope config mapping, checked against transformers 5."""

import json
import math
import os

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lrjax import factors, rope

D = 16  # rotary dim of the tiny configs below
LONG = [1.0 + 0.5 * k for k in range(D // 2)]
SHORT = [1.0 + 0.05 * k for k in range(D // 2)]

SETTINGS = {
    "default": rope.RopeScaling(),
    "linear": rope.RopeScaling(method="linear", factor=4.0),
    "ntk": rope.RopeScaling(method="ntk", factor=4.0),
    "dynamic": rope.RopeScaling(method="dynamic", factor=2.0),
    "yarn": rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=64),
    "yarn_untruncated": rope.RopeScaling(method="yarn", factor=4.0, original_max_position_embeddings=64,
                                         truncate=False, beta_fast=16.0, beta_slow=2.0, attention_factor=1.3),
    "yarn_mscale": rope.RopeScaling(method="yarn", factor=40.0, original_max_position_embeddings=64, mscale=0.707,
                                    mscale_all_dim=1.0),
    "llama3": rope.RopeScaling(method="llama3", factor=8.0, original_max_position_embeddings=64),
    "longrope": rope.RopeScaling(method="longrope", factor=4.0, original_max_position_embeddings=64,
                                 long_factor=LONG, short_factor=SHORT),
    "longrope_long_only": rope.RopeScaling(method="longrope", factor=8.0, original_max_position_embeddings=64,
                                           long_factor=LONG, temperature="yarn"),
}


def _tiny_hf(**kw) -> dict:
  base = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_attention_heads=4,
              num_key_value_heads=4, head_dim=D, intermediate_size=32, num_hidden_layers=1, vocab_size=32,
              max_position_embeddings=256)
  return {**base, **kw}


def _hf_config(config_dict, tmp_path, cls=transformers.LlamaConfig):
  """Loads config.json the way from_pretrained does."""
  (tmp_path / "config.json").write_text(json.dumps(config_dict))
  return cls.from_pretrained(tmp_path)


def _hf_inv_freq(cfg, seq_len=None):
  kind = cfg.rope_parameters["rope_type"]
  if kind == "default":
    inv, attn = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
  else:
    inv, attn = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)
  return inv.numpy(), float(attn)


def _ours(scaling, theta, seq_len, max_pos=256):
  return rope.inv_freq_and_attention_factor(scaling, dim=D, theta=theta, max_position_embeddings=max_pos,
                                            seq_len=seq_len)


def _assert_same_rope(cfg, theta, scaling, seq_lens=(None, 40, 65, 200)):
  for seq in seq_lens:
    if seq is None and scaling.method == "longrope":
      continue  # transformers' init-time set is the short one; lrjax's seq_len=None means the long one
    hf_inv, hf_attn = _hf_inv_freq(cfg, seq)
    inv, attn = _ours(scaling, theta, seq, cfg.max_position_embeddings)
    np.testing.assert_allclose(inv, hf_inv, rtol=1e-6, err_msg=f"seq_len={seq}")
    assert attn == pytest.approx(hf_attn, rel=1e-12), f"seq_len={seq}"


# ------------------------------------------------------------------------------------------------------------
# Files.


@pytest.mark.parametrize("name", list(SETTINGS))
def test_json_round_trip_every_method(tmp_path, name):
  path = tmp_path / "f.json"
  factors.save(path, SETTINGS[name], {"seed": np.int64(3), "fitness": np.float32(1.5)}, target_length=256)
  got = factors.read(path, rotary_dim=D)
  assert got.scaling == SETTINGS[name]
  assert got.target_length == 256
  assert got.provenance["seed"] == 3 and got.provenance["fitness"] == 1.5 and "saved_at" in got.provenance
  assert factors.load(path) == SETTINGS[name]


def test_json_round_trip_per_layer_buckets_nhat(tmp_path):
  table = np.linspace(1, 9, 3 * 8).reshape(3, 8)
  s = rope.RopeScaling(method="longrope", factor=8.0, original_max_position_embeddings=64, long_factor=table,
                       short_factor=table[::-1], buckets=((128, table * 0.5 + 1),), n_hat=4, temperature=1.07)
  path = tmp_path / "per_layer.json"
  factors.save(path, s)
  got = factors.load(path, n_layers=3, rotary_dim=16)
  assert got == s
  np.testing.assert_array_equal(np.asarray(got.long_factor), table)  # exact: JSON floats round-trip
  with pytest.raises(factors.FactorFileError, match=r"per_layer.json: long_factor has 3 per-layer rows but the "
                                                    r"model has 2 layers"):
    factors.load(path, n_layers=2)


def test_csv_round_trip_and_numpy_compatibility(tmp_path):
  vec = np.array([1.0, 1.25, 3.0, 2.5, 7.123456789012345, 8.0, 16.0, 32.0])  # not monotone: allowed
  path = tmp_path / "result_final.csv"
  factors.save_csv(path, vec)
  np.testing.assert_array_equal(np.loadtxt(path, delimiter=","), vec)
  got = factors.load(path, rotary_dim=16)
  assert got.method == "longrope" and got.factor is None
  np.testing.assert_array_equal(got.long_factor, vec)
  table = np.stack([vec, vec * 2, vec * 3])
  factors.save_csv(tmp_path / "layers.csv", table)
  np.testing.assert_array_equal(np.loadtxt(tmp_path / "layers.csv", delimiter=","), table)
  np.testing.assert_array_equal(factors.load(tmp_path / "layers.csv", n_layers=3).long_factor, table)


def test_reads_files_written_by_numpy(tmp_path):
  """The official search writes np.savetxt(..., delimiter='\\n'); the paper tables are comma-separated rows."""
  vec = np.linspace(1, 32, 8)
  np.savetxt(tmp_path / "official.csv", vec, delimiter="\n")
  np.testing.assert_allclose(factors.load(tmp_path / "official.csv").long_factor, vec, rtol=1e-15)
  np.savetxt(tmp_path / "table.csv", np.tile(vec, (4, 1)), delimiter=",")
  assert np.asarray(factors.load(tmp_path / "table.csv", n_layers=4).long_factor).shape == (4, 8)
  np.savetxt(tmp_path / "row.csv", vec[None], delimiter=",")  # a single row is one shared vector
  assert np.asarray(factors.load(tmp_path / "row.csv", rotary_dim=16).long_factor).shape == (8,)


@pytest.mark.parametrize("content, match", [
    ("1\n2\nnan\n", r"bad.csv: long_factor contains NaN or inf"),
    ("1\n2\n-1\n", r"bad.csv: long_factor must be > 0, found -1"),
    ("1\n0\n", r"bad.csv: long_factor must be > 0, found 0"),
    ("1,2\n1,2,3\n", r"bad.csv: rows have different lengths"),
    ("1\nabc\n", r"bad.csv: line 2 is not comma-separated numbers"),
    ("\n\n", r"bad.csv: no factors found"),
])
def test_bad_csv(tmp_path, content, match):
  (tmp_path / "bad.csv").write_text(content)
  with pytest.raises(factors.FactorFileError, match=match):
    factors.load(tmp_path / "bad.csv")


def test_bad_json(tmp_path):
  path = tmp_path / "f.json"

  def write(doc):
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))

  good = {"format": "lrjax-rope-scaling", "version": 1,
          "scaling": {"method": "longrope", "long_factor": [1.0] * 8}}
  cases = [
      ("{not json", r"f.json: malformed JSON"),
      ({**good, "format": "other"}, r"f.json: not an lrjax factor file"),
      ({**good, "version": 9}, r"f.json: unsupported factor file version 9"),
      ({**good, "extra": 1}, r"f.json: unknown keys extra"),
      ({**good, "scaling": {"method": "longrope", "long_factor": [1.0] * 8, "lambda": 2}},
       r"f.json: unknown scaling keys lambda"),
      ({**good, "scaling": {"long_factor": [1.0] * 8}}, r"f.json: missing 'method'"),
      ({**good, "scaling": {"method": "magic"}}, r"f.json: unknown rope method 'magic'"),
      ('{"format": "lrjax-rope-scaling", "version": 1, "scaling": {"method": "longrope", "long_factor": '
       '[1, NaN, 2, 2, 2, 2, 2, 2]}}', r"f.json: long_factor contains NaN or inf"),
      ({**good, "scaling": {"method": "longrope", "long_factor": [1.0] * 8, "short_factor": [0.0] * 8}},
       r"f.json: short_factor must be > 0"),
      ({**good, "target_length": -5}, r"f.json: target_length must be a positive integer"),
      ({**good, "scaling": [1.0, 2.0]}, r"f.json: 'scaling' must be a JSON object"),
      ({**good, "scaling": {"method": "longrope", "long_factor": [[1.0, 2.0], [1.0]]}},
       r"f.json: long_factor is not a list of numbers \(or of equal-length rows\)"),
  ]
  for doc, match in cases:
    write(doc)
    with pytest.raises(factors.FactorFileError, match=match):
      factors.load(path)
  write(good)
  with pytest.raises(factors.FactorFileError, match=r"f.json: long_factor has 8 factors but rotary_dim/2 = 16"):
    factors.load(path, rotary_dim=32)
  with pytest.raises(factors.FactorFileError, match=r"missing.json: cannot read factor file"):
    factors.load(tmp_path / "missing.json")


def test_failed_save_keeps_existing_file(tmp_path):
  path = tmp_path / "f.json"
  factors.save(path, SETTINGS["longrope"])
  before = path.read_bytes()
  with pytest.raises(factors.FactorFileError, match="non-finite"):
    factors.save(path, SETTINGS["linear"], {"fitness": float("nan")})
  with pytest.raises(TypeError, match="not JSON-serialisable"):
    factors.save(path, SETTINGS["linear"], {"obj": object()})
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["f.json"]  # no temp files left behind


# ------------------------------------------------------------------------------------------------------------
# HF config parsing: our parse must give the frequencies transformers 5 computes from the same file.


PHI3_LONG = [1.0 + 0.5 * k for k in range(8)]
PHI3_SHORT = [1.0 + 0.05 * k for k in range(8)]
PARSE_CASES = {
    "v4_linear": _tiny_hf(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}),
    "v4_dynamic": _tiny_hf(max_position_embeddings=64, rope_theta=10000.0,
                           rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "v4_yarn": _tiny_hf(rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 64}),
    "v4_yarn_no_factor": _tiny_hf(rope_theta=10000.0, rope_scaling={
        "type": "yarn", "factor": None, "original_max_position_embeddings": 64, "beta_fast": 0, "truncate": False}),
    "v4_llama3": _tiny_hf(max_position_embeddings=512, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "v4_none": _tiny_hf(rope_theta=20000.0, rope_scaling=None),
    "v5_default": _tiny_hf(rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
    "v5_yarn": _tiny_hf(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 64, "mscale": 0.707,
                                         "mscale_all_dim": 1.0}),
    "v5_longrope": _tiny_hf(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0,
                                             "original_max_position_embeddings": 64,
                                             "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}),
    "phi3_su": _tiny_hf(rope_theta=10000.0, original_max_position_embeddings=64, rope_scaling={
        "type": "su", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}),
    "phi3_yarn_alias": _tiny_hf(rope_theta=10000.0, original_max_position_embeddings=64, rope_scaling={
        "type": "yarn", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}),
}


@pytest.mark.parametrize("name", list(PARSE_CASES))
def test_parse_matches_transformers(tmp_path, name):
  config = PARSE_CASES[name]
  theta, scaling = factors.rope_scaling_from_hf(config)
  cls = transformers.Phi3Config if name.startswith("phi3") else transformers.LlamaConfig
  if name == "phi3_su":
    # transformers 5.24's Phi3Config renames "su" only after standardising, so it rejects its own legacy form;
    # the reference is the same file with the type it is renamed to.
    config = {**config, "rope_scaling": {**config["rope_scaling"], "type": "longrope"}}
  cfg = _hf_config(config, tmp_path, cls)
  assert theta == cfg.rope_parameters["rope_theta"]
  _assert_same_rope(cfg, theta, scaling)
  if name.startswith("phi3"):
    assert scaling.method == "longrope"
    assert _ours(scaling, theta, 65)[1] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))


def test_parse_nested_per_layer_type_takes_full_attention():
  config = _tiny_hf(rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
  with pytest.warns(UserWarning, match="nested per layer type .*using 'full_attention'"):
    theta, scaling = factors.rope_scaling_from_hf(config)
  assert (theta, scaling) == (1e6, rope.RopeScaling(method="linear", factor=2.0))
  with pytest.raises(rope.RopeError, match="no 'full_attention' entry"):
    factors.rope_scaling_from_hf(_tiny_hf(rope_parameters={"sliding_attention": {"rope_type": "default"}}))


def test_parse_v4_and_v5_forms_agree():
  v4 = _tiny_hf(rope_theta=5e5, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
  v5 = _tiny_hf(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                 "original_max_position_embeddings": 64})
  assert factors.rope_scaling_from_hf(v4) == factors.rope_scaling_from_hf(v5)


@pytest.mark.parametrize("rope_dict, match", [
    ({"type": "mrope", "factor": 2.0}, r"unsupported rope type 'mrope'"),
    ({"rope_type": "proportional", "factor": 2.0}, r"unsupported rope type 'proportional'"),
    ({"type": "linear"}, r"linear rope scaling needs 'factor'"),
    ({"type": "llama3", "factor": 8.0}, r"llama3 rope scaling needs low_freq_factor, high_freq_factor"),
    ({"type": "longrope", "long_factor": LONG}, r"longrope rope scaling needs both short_factor and long_factor"),
    ({"type": "longrope", "long_factor": LONG, "short_factor": SHORT, "long_mscale": 1.2},
     r"rope keys long_mscale .* not supported"),
    ({"type": "longrope", "long_factor": LONG[:-1] + [float("nan")], "short_factor": SHORT},
     r"long_factor contains NaN or inf"),
])
def test_parse_errors(rope_dict, match):
  with pytest.raises(rope.RopeError, match=match):
    factors.rope_scaling_from_hf(_tiny_hf(rope_scaling=rope_dict))


def test_parse_warns_about_keys_transformers_ignores():
  with pytest.warns(UserWarning, match="ignoring yarn rope keys attn_factor"):
    factors.rope_scaling_from_hf(_tiny_hf(rope_scaling={"type": "yarn", "factor": 4.0, "attn_factor": 0.87}))


# ------------------------------------------------------------------------------------------------------------
# Export: the written config must give our frequencies in transformers 5, in both forms.


@pytest.mark.parametrize("name", list(SETTINGS))
def test_export_loads_identically_in_transformers(tmp_path, name):
  scaling, theta = SETTINGS[name], 10000.0
  fields = factors.rope_scaling_to_hf(scaling, rope_theta=theta, max_position_embeddings=256, rotary_dim=D)
  assert fields["rope_parameters"]["rope_theta"] == fields["rope_theta"]
  if fields["rope_scaling"] is not None:
    both = {k: v for k, v in fields["rope_scaling"].items() if k != "type"}
    assert both == {k: v for k, v in fields["rope_parameters"].items() if k != "rope_theta"}
    assert fields["rope_scaling"]["type"] == fields["rope_scaling"]["rope_type"]
  full = _tiny_hf(**fields)
  v4_only = _tiny_hf(**{k: v for k, v in fields.items() if k != "rope_parameters"})
  v5_only = _tiny_hf(**{k: v for k, v in fields.items() if k not in ("rope_scaling", "rope_theta")})
  for i, config in enumerate((full, v4_only, v5_only)):
    sub = tmp_path / str(i)
    sub.mkdir()
    _assert_same_rope(_hf_config(config, sub), theta, scaling)
    # and our own parser reads the export back to the same frequencies
    theta2, back = factors.rope_scaling_from_hf(json.loads(json.dumps(config)))
    for seq in (None, 40, 65):
      np.testing.assert_allclose(_ours(back, theta2, seq)[0], _ours(scaling, theta, seq)[0], rtol=1e-7)
      assert _ours(back, theta2, seq)[1] == pytest.approx(_ours(scaling, theta, seq)[1], rel=1e-12)


def test_export_ntk_is_default_type_with_larger_theta():
  fields = factors.rope_scaling_to_hf(SETTINGS["ntk"], rope_theta=10000.0, max_position_embeddings=256,
                                      rotary_dim=128)
  assert fields["rope_scaling"] is None and fields["rope_parameters"]["rope_type"] == "default"
  assert fields["rope_theta"] == pytest.approx(40889.94, abs=0.01)  # b·s^(d/(d-2)), d=128, s=4


def test_export_errors_and_explicit_n_hat_drop():
  s = SETTINGS["longrope"].replace(n_hat=4)
  kw = dict(rope_theta=1e4, max_position_embeddings=256, rotary_dim=D)
  with pytest.raises(rope.RopeError, match=r"n_hat=4 cannot be expressed in an HF config"):
    factors.rope_scaling_to_hf(s, **kw)
  dropped = factors.rope_scaling_to_hf(s, allow_dropping_n_hat=True, **kw)
  assert dropped == factors.rope_scaling_to_hf(SETTINGS["longrope"], **kw)
  table = rope.RopeScaling(method="longrope", factor=4.0, long_factor=np.ones((2, 8)),
                           original_max_position_embeddings=64)
  with pytest.raises(rope.RopeError, match=r"per-layer long_factor tables cannot be expressed"):
    factors.rope_scaling_to_hf(table, **kw)
  bucketed = SETTINGS["longrope"].replace(buckets=((128, LONG),))
  with pytest.raises(rope.RopeError, match=r"bucketed longrope factors cannot be expressed"):
    factors.rope_scaling_to_hf(bucketed, **kw)
  with pytest.raises(rope.RopeError, match=r"long_factor has 8 factors but rotary_dim/2 = 16"):
    factors.rope_scaling_to_hf(SETTINGS["longrope"], rope_theta=1e4, max_position_embeddings=256, rotary_dim=32)


# ----------------------------------------------------------------------------------------------------------
# One temperature rule on every path: s = target length / original window unless the setting says otherwise.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_128K = os.path.join(ROOT, "configs", "factors", "llama2_7b_ft_128k.csv")


def _llama2():
  from lrjax import model
  return model.ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096)


def _hf_longrope_attention_factor(long_factor, max_position_embeddings, original):
  cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, num_hidden_layers=1,
                                 max_position_embeddings=max_position_embeddings, rope_parameters={
                                     "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": long_factor,
                                     "long_factor": long_factor, "original_max_position_embeddings": original})
  return float(ROPE_INIT_FUNCTIONS["longrope"](cfg, None)[1])


def test_published_csv_takes_its_temperature_from_the_target_length():
  """The official CSV evaluated at 128k on a 4k model: mscale = transformers' longrope attention factor for that
  target (1.1902), where lrjax used to evaluate it with 1.0; and on every path the same value."""
  from lrjax import evaluate, train
  mc = _llama2()
  table = factors.load(PUBLISHED_128K).long_factor
  want = _hf_longrope_attention_factor(list(table), 131072, 4096)
  assert want == pytest.approx(1.1902380714238083, rel=1e-12)
  scaling = factors.resolve_file(PUBLISHED_128K, original_length=4096, target_length=131072, rotary_dim=128)
  assert (scaling.factor, scaling.original_max_position_embeddings) == (32.0, 4096)
  assert float(mc.rope_arrays(scaling, seq_len=8192).mscale) == pytest.approx(want, rel=1e-6)
  setting = evaluate.parse_setting(f"{PUBLISHED_128K}?target_length=131072", mc)
  assert float(mc.rope_arrays(setting.scaling_at(8192), seq_len=8192).mscale) == pytest.approx(want, rel=1e-6)
  stage = train.stage_rope({"length": 131072, "rope": PUBLISHED_128K}, mc)
  assert stage == scaling
  # A bare table without a target is an error naming what is missing, never s = 1.
  with pytest.raises(factors.FactorFileError, match="target length"):
    factors.resolve_file(PUBLISHED_128K, original_length=4096)
  with pytest.raises(ValueError, match=r"target_length"):
    evaluate.parse_setting(PUBLISHED_128K, mc)
  with pytest.raises(rope.RopeError, match="no extension ratio s = target length / original window"):
    mc.rope_arrays(rope.RopeScaling(method="longrope", long_factor=table))


def test_temperature_can_follow_the_evaluated_length_as_the_paper_code_did():
  """temperature_from=length: mscale = sqrt(1 + ln(n/L) / ln L) at n > L, 1 within the window."""
  from lrjax import evaluate
  mc = _llama2()
  setting = evaluate.parse_setting(f"{PUBLISHED_128K}?target_length=131072&temperature_from=length", mc)
  for n, want in ((2048, 1.0), (4096, 1.0), (8192, math.sqrt(1 + math.log(2) / math.log(4096))),
                  (131072, math.sqrt(1 + math.log(32) / math.log(4096)))):
    assert float(mc.rope_arrays(setting.scaling_at(n), seq_len=n).mscale) == pytest.approx(want, rel=1e-6), n
  with pytest.raises(rope.RopeError, match="cannot be combined with an explicit attention_factor"):
    rope.RopeScaling(method="longrope", factor=2.0, long_factor=LONG, attention_factor=1.1, temperature_from="length")


def test_original_window_is_a_property_of_the_model(tmp_path):
  """Mistral-7B v0.1 style (sliding window 32 of max_position_embeddings 256): L = 32 everywhere."""
  from configs import finetune
  from lrjax import evaluate, model, weights
  cfg = weights.config_from_hf({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "max_position_embeddings": 256, "sliding_window": 32})
  assert cfg.original_length == 32 and cfg.max_position_embeddings == 256
  # PI/YaRN baselines scale from the window (s = 64 / 32), not from max_position_embeddings (where s = 1).
  pi = evaluate.parse_setting("pi", cfg).scaling_at(64)
  yarn = evaluate.parse_setting("yarn", cfg).scaling_at(64)
  assert pi.factor == 2.0 and yarn.factor == 2.0 and yarn.original_max_position_embeddings == 32
  # The export carries the window (transformers 4 reads original_max_position_embeddings at the top level).
  exported = weights.config_to_hf(cfg)
  assert exported["original_max_position_embeddings"] == 32
  assert weights.config_from_hf(exported).original_length == 32
  # Phi-3 style: the top-level original window.
  phi = dict(exported, original_max_position_embeddings=16)
  assert weights.config_from_hf(phi).original_length == 16
  # The paper-scale Mistral config measures s against 4096, not 32768.
  assert model.ModelConfig(**finetune.MISTRAL_7B).original_length == 4096
