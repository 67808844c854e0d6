"""Tokenizers against the libraries they wrap (sentencepiece, tokenizers + transformers) and bytes by hand."""

import json

import numpy as np
import pytest

from lrjax import tokenizers

TEXTS = ["Hello world, this is a tiny corpus.", "def f(x):\n    return x + 1  # café ☕", "",
         "   leading spaces and tabs\t!"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "to be or not to be that is the question",
    "all that glitters is not gold",
    "def main():\n    print('hello world')\n",
    "import numpy as np; x = np.zeros(3)",
    "café résumé naïve ☕ über",
] * 4


def test_byte_round_trip_and_ids():
  tok = tokenizers.load_tokenizer("byte")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (256, None, None)
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  with pytest.raises(tokenizers.TokenizerError, match=r"\[0, 255\]"):
    tok.decode([300])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  d = tmp_path_factory.mktemp("sp")
  corpus = d / "corpus.txt"
  corpus.write_text("\n".join(CORPUS), encoding="utf-8")
  spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=60,
                                 model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                 pad_id=-1, minloglevel=2)
  return d / "tokenizer.model"


def test_sentencepiece_matches_library(sp_model):
  import sentencepiece as spm
  ref = spm.SentencePieceProcessor(model_file=str(sp_model))
  for spec in (sp_model, sp_model.parent):  # the file, and a directory holding it
    tok = tokenizers.load_tokenizer(str(spec))
    assert isinstance(tok, tokenizers.SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (ref.get_piece_size(), 1, 2)
    for text in TEXTS + CORPUS[:3]:
      ids = tok.encode(text)
      assert ids.tolist() == ref.encode(text)  # no BOS: lrjax.data adds it
      assert tok.decode(ids) == ref.decode(ref.encode(text))


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
  tk = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers, decoders, processors, trainers
  tok = tk.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  d = tmp_path_factory.mktemp("hf")
  tok.save(str(d / "tokenizer.json"))
  return d / "tokenizer.json"


def test_hf_tokenizer_matches_transformers(hf_file, tmp_path):
  transformers = pytest.importorskip("transformers")
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_file))
  tok = tokenizers.load_tokenizer(str(hf_file))
  assert isinstance(tok, tokenizers.HFTokenizer)
  assert tok.vocab_size == len(ref)
  assert (tok.bos_id, tok.eos_id) == (1, None)  # from the post-processor template "<s> $A"
  for text in TEXTS + CORPUS[:3]:
    ids = tok.encode(text)
    assert ids.tolist() == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids.tolist())
  # tokenizer_config.json, when present, names BOS/EOS (the LLaMA 3 layout).
  d = tmp_path / "model"
  d.mkdir()
  (d / "tokenizer.json").write_bytes(hf_file.read_bytes())
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
  tok = tokenizers.load_tokenizer(str(d))
  assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_directory_prefers_tokenizer_json(hf_file, sp_model, tmp_path):
  (tmp_path / "tokenizer.json").write_bytes(hf_file.read_bytes())
  (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
  assert isinstance(tokenizers.load_tokenizer(str(tmp_path)), tokenizers.HFTokenizer)


def test_bad_specs(tmp_path):
  with pytest.raises(tokenizers.TokenizerError, match="no such file"):
    tokenizers.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(tokenizers.TokenizerError, match="no tokenizer.json or tokenizer.model"):
    tokenizers.load_tokenizer(str(tmp_path))
  bad = tmp_path / "tokenizer.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(tokenizers.TokenizerError, match="not a SentencePiece model"):
    tokenizers.load_tokenizer(str(bad))
  bad_json = tmp_path / "tok.json"
  bad_json.write_text("{}")
  with pytest.raises(tokenizers.TokenizerError, match="not a tokenizers JSON file"):
    tokenizers.load_tokenizer(str(bad_json))
  other = tmp_path / "vocab.txt"
  other.write_text("a")
  with pytest.raises(tokenizers.TokenizerError, match="unknown tokenizer file type"):
    tokenizers.load_tokenizer(str(other))


# ------------------------------------------------------------------------------------------------------------
# add_bos / add_eos and chat templates, against what transformers' tokenizers do with the same files.

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "  4  "}, {"role": "user", "content": "café <b>&</b>", "name": None}],
]
# Exercises transformers' environment: trim_blocks/lstrip_blocks, loop controls, raise_exception, the
# non-escaping tojson, {% generation %} and the special-token variables.
TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
  {%- set system = messages[0]['content'] %}{% set messages = messages[1:] %}
{%- else %}{% set system = 'You are helpful.' %}{% endif %}
{{ bos_token }}<|im_start|>system
{{ system }}<|im_end|>
{% for message in messages %}
  {% if message['role'] not in ['user', 'assistant'] %}
    {{- raise_exception('Unknown role: ' + message['role']) }}
  {% endif %}
<|im_start|>{{ message['role'] }}
  {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
  {% else %}{{ message['content'] }} {{ message | tojson }}{% endif %}<|im_end|>
  {% if loop.index > 10 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}{{ eos_token if not add_generation_prompt }}"""


def _model_input(tok, text):
  """What the checkpoint's tokenizer feeds the model, by lrjax's flags."""
  return [tok.bos_id] * tok.add_bos + tok.encode(text).tolist() + [tok.eos_id] * tok.add_eos


def _same_chats(tok, ref):
  for chat in CHATS:
    for prompt in (True, False):
      assert tok.apply_chat_template(chat, add_generation_prompt=prompt) == \
          ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)


def test_byte_has_no_flags_or_template():
  tok = tokenizers.load_tokenizer("byte")
  assert (tok.add_bos, tok.add_eos, tok.chat_template) == (False, False, None)
  assert isinstance(tok, tokenizers.Tokenizer)
  with pytest.raises(tokenizers.TokenizerError, match="no chat template"):
    tok.apply_chat_template(CHATS[0])


def test_sentencepiece_flags_and_template(sp_model, tmp_path):
  transformers = pytest.importorskip("transformers")
  tok = tokenizers.load_tokenizer(str(sp_model))
  # A bare tokenizer.model is LLaMA 1/2's: Meta's and llama.cpp's encoders add BOS, never EOS.
  assert (tok.add_bos, tok.add_eos, tok.chat_template) == (True, False, None)
  d = tmp_path / "sp"
  d.mkdir()
  (d / "tokenizer.model").write_bytes(sp_model.read_bytes())
  (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True,
                                                      "chat_template": TEMPLATE}))
  tok = tokenizers.load_tokenizer(str(d))
  ref = transformers.LlamaTokenizer.from_pretrained(str(d))
  assert (tok.add_bos, tok.add_eos, tok.special_tokens["bos_token"]) == (False, True, "<s>")
  for text in CORPUS[:3]:
    assert ref(text).input_ids[-1] == 2 and ref(text).input_ids[0] != 1  # the flags as transformers applies them
  _same_chats(tok, ref)


def test_hf_flags_from_post_processor_and_config(hf_file, tmp_path):
  """add_bos/add_eos say what transformers adds to model input: the tokenizer.json post-processor decides
  (transformers 5 drops tokenizer_config.json's add_bos_token/add_eos_token beside a tokenizer.json)."""
  transformers = pytest.importorskip("transformers")
  no_post = json.loads(hf_file.read_text())
  no_post["post_processor"] = None
  cases = [(hf_file.read_text(), None, None, (True, False, None)),  # "<s> $A", no config
           (hf_file.read_text(), {"add_bos_token": False, "add_eos_token": True, "chat_template": TEMPLATE}, None,
            (True, False, TEMPLATE)),
           (json.dumps(no_post), {"add_bos_token": True, "chat_template": "{{ x }}"}, TEMPLATE,
            (False, False, TEMPLATE)),  # chat_template.jinja wins over the config's entry
           (json.dumps(no_post), None, None, (False, False, None))]
  for k, (tokenizer_json, config, jinja, expected) in enumerate(cases):
    d = tmp_path / f"hf{k}"
    d.mkdir()
    (d / "tokenizer.json").write_text(tokenizer_json)
    if config is not None:
      (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", **config}))
    if jinja:
      (d / "chat_template.jinja").write_text(jinja)
    tok = tokenizers.load_tokenizer(str(d))
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert (tok.add_bos, tok.add_eos, tok.chat_template) == expected, k
    for text in TEXTS:
      assert _model_input(tok, text) == ref(text).input_ids, (k, text)
    if tok.chat_template:
      _same_chats(tok, ref)


def test_chat_template_errors_are_one_line(hf_file, tmp_path):
  tok = tokenizers.HFTokenizer.from_file(str(hf_file))
  tok.chat_template = TEMPLATE
  with pytest.raises(tokenizers.TokenizerError, match="chat template: Unknown role: tool") as e:
    tok.apply_chat_template([{"role": "tool", "content": "x"}])
  assert "\n" not in str(e.value)
  tok.chat_template = "{% for m in messages %}{{ m.content }"
  with pytest.raises(tokenizers.TokenizerError, match="chat template:"):
    tok.apply_chat_template(CHATS[0])
  with pytest.raises(tokenizers.TokenizerError, match="non-empty list of dicts"):
    tok.apply_chat_template([])
  tok.chat_template = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses attribute escapes, as in transformers
  with pytest.raises(tokenizers.TokenizerError, match="chat template:"):
    tok.apply_chat_template(CHATS[0])


# ------------------------------------------------------------------------------------------------------------
# Tokenizers from GGUF metadata, against transformers' AutoTokenizer(gguf_file=...).

TRICKY = TEXTS + ["<s>hi</s> <s>", "x<|im_start|>user\n<tool>y<|endoftext|>", "\n\n  \t\n", "naïve 日本語 🤗 x",
                  " the fox  "]


def _write_tokenizer_gguf(path, **fields):
  import gguf
  w = gguf.GGUFWriter(str(path), arch="llama")
  for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                     ("feed_forward_length", 64), ("attention.head_count", 2)):
    w.add_uint32(f"llama.{key}", value)
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
  for name, value in fields.items():
    getattr(w, f"add_{name}")(value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("pre", ["default", "llama-bpe"])
def test_gguf_byte_level_bpe_matches_transformers(hf_file, tmp_path, pre):
  transformers = pytest.importorskip("transformers")
  doc = json.loads(hf_file.read_text())
  vocab = doc["model"]["vocab"]
  tokens = sorted(vocab, key=vocab.get) + ["<|im_start|>", "<tool>", "<|endoftext|>"]  # the last one not CONTROL
  merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
  types = [3 if t in ("<unk>", "<s>", "</s>", "<|im_start|>") else 4 if t == "<tool>" else 1 for t in tokens]
  _write_tokenizer_gguf(tmp_path / "t.gguf", tokenizer_model="gpt2", tokenizer_pre=pre, token_list=tokens,
                        token_merges=merges, token_types=types, bos_token_id=1, eos_token_id=2, unk_token_id=0,
                        add_bos_token=False, chat_template=TEMPLATE)
  tok = tokenizers.load_tokenizer(tmp_path / "t.gguf")
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (len(ref), 1, 2, False)
  for text in TRICKY + CORPUS[:7]:
    ids = tok.encode(text)
    assert ids.tolist() == ref.encode(text, add_special_tokens=False), repr(text)
    assert tok.decode(ids) == ref.decode(ids.tolist())
    assert _model_input(tok, text) == ref(text).input_ids
  # Word splits too, where a tiny vocabulary's merges cannot tell the regexes apart (LLaMA 3: digits in threes).
  split = lambda t, text: [piece for piece, _ in t.pre_tokenizer.pre_tokenize_str(text)]
  for text in TRICKY + ["x 12345 (hello) THEY'RE\n\n  y"]:
    assert split(tok._tok, text) == split(ref.backend_tokenizer, text)
  _same_chats(tok, ref)


@pytest.mark.parametrize("add_bos", [None, False])
def test_gguf_sentencepiece_bpe_matches_transformers_and_sentencepiece(tmp_path, add_bos):
  transformers = pytest.importorskip("transformers")
  spm = pytest.importorskip("sentencepiece")
  d = tmp_path / "sp"
  d.mkdir()
  (d / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
  spm.SentencePieceTrainer.Train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=320,
                                 model_type="bpe", character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2,
                                 unk_id=0, pad_id=-1, user_defined_symbols=["<tool>"], minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=str(d / "sp.model"))
  tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  # llama.cpp's token types for a SentencePiece vocabulary (convert_hf_to_gguf.py _create_vocab_sentencepiece).
  types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
           4 if tokens[i] == "<tool>" else 1 for i in range(len(tokens))]
  fields = dict(tokenizer_model="llama", token_list=tokens, token_scores=[sp.get_score(i) for i in range(len(tokens))],
                token_types=types, bos_token_id=1, eos_token_id=2, unk_token_id=0)
  if add_bos is not None:
    fields["add_bos_token"] = add_bos
  _write_tokenizer_gguf(tmp_path / "t.gguf", **fields)
  tok = tokenizers.load_tokenizer(tmp_path / "t.gguf")
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
  assert (tok.vocab_size, tok.add_bos, tok.add_eos) == (len(ref), add_bos is None, False)
  for text in TRICKY + CORPUS[:7]:
    ids = tok.encode(text)
    assert ids.tolist() == ref.encode(text, add_special_tokens=False), repr(text)
    assert tok.decode(ids) == ref.decode(ids.tolist())
    assert _model_input(tok, text) == ref(text).input_ids
  for text in CORPUS[:4] + ["Hello world", "naïve über"]:  # plain text: the SentencePiece model itself agrees
    assert tok.encode(text).tolist() == sp.encode(text)
