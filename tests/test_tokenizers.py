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
