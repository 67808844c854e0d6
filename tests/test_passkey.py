"""Passkey prompt construction and scoring."""

import numpy as np
import pytest

from lrjax import passkey


class Bytes:
  bos_id = None

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids):
    return bytes(int(i) for i in ids).decode(errors="replace")


@pytest.mark.parametrize("fmt", ["paper", "python"])
@pytest.mark.parametrize("length", [256, 2048])
def test_prompt_has_needle_at_target_length(fmt, length):
  rng = np.random.default_rng(0)
  s = passkey.build_sample(Bytes(), length, rng, fmt)
  text = Bytes().decode(s.tokens)
  f = passkey.FORMATS[fmt]
  assert f["needle"].format(key=s.key) in text
  assert text.startswith(f["intro"]) and text.endswith(f["question"])
  assert abs(len(s.tokens) - length) <= len(f["filler"])
  assert 1 <= s.key <= 50000


@pytest.mark.parametrize("add_bos", [True, False])
def test_bos_only_when_the_tokenizer_adds_it(add_bos):
  class WithBos(Bytes):
    bos_id = 0
  tok = WithBos()
  tok.add_bos = add_bos
  s = passkey.build_sample(tok, 256, np.random.default_rng(0))
  plain = passkey.build_sample(Bytes(), 256, np.random.default_rng(0))
  np.testing.assert_array_equal(s.tokens, np.concatenate([[0], plain.tokens]) if add_bos else plain.tokens)


def test_needle_depth_is_uniform_and_reproducible():
  depths = [passkey.build_sample(Bytes(), 1024, np.random.default_rng(i)).depth for i in range(200)]
  assert 0.4 < np.mean(depths) < 0.6 and min(depths) < 0.1 and max(depths) > 0.9
  a = passkey.build_sample(Bytes(), 1024, np.random.default_rng(7))
  b = passkey.build_sample(Bytes(), 1024, np.random.default_rng(7))
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_score_takes_first_integer():
  assert passkey.score(" 4821. Remember", 4821)
  assert not passkey.score(" 482 1", 4821)
  assert not passkey.score(" the key", 4821)
  assert passkey.score(" 012", 12)


def test_accuracy_counts_correct_answers(monkeypatch):
  """With a decoder that answers the true key for every other prompt, accuracy is 1/2 at every length."""
  calls = []

  def fake_generate(config, params, prompt, n, **kw):
    calls.append(kw)
    text = Bytes().decode(prompt[0])
    key = int(text.split("The pass key is ")[1].split(".")[0])
    answer = f" {key}." if len(calls) % 2 else " 0."
    return np.asarray([Bytes().encode(answer)])

  monkeypatch.setattr(passkey.decode, "greedy_generate", fake_generate)
  rows = passkey.accuracy(None, None, Bytes(), lengths=[300, 600], scaling_for_length=lambda n: None,
                          samples=4)
  assert [r["accuracy"] for r in rows] == [0.5, 0.5]
  assert len(calls) == 8


def test_unknown_format():
  with pytest.raises(ValueError, match="unknown passkey format"):
    passkey.build_sample(Bytes(), 100, np.random.default_rng(0), "haiku")


def _counting(monkeypatch):
  calls = []
  real = passkey.decode.greedy_generate

  def generate(config, params, prompt, n, **kw):
    calls.append(prompt.shape[1])
    return real(config, params, prompt, n, **kw)

  monkeypatch.setattr(passkey.decode, "greedy_generate", generate)
  return calls


def _config(**kw):
  from configs import passkey as passkey_config
  c = passkey_config.get_config()
  c.lengths, c.samples, c.max_new_tokens, c.progress = (256, 512), 2, 4, False
  for k, v in kw.items():
    c[k] = v
  return c


def test_run_resumes_and_shares_answers_of_equal_rope(monkeypatch, tmp_path):
  """The experiment on the built-in model (window 256): YaRN equals none at 256 tokens and shares its answers;
  a rerun with more samples decodes only the new prompts, and gives what a fresh run gives."""
  from lrjax import evaluate
  model = evaluate.load_model(_config())
  calls = _counting(monkeypatch)
  first = passkey.run(_config(), str(tmp_path / "a"), model=model, print_fn=lambda s: None)
  assert len(calls) == 6  # none: 2 at 256 + 2 at 512; yarn: 2 at 512 (256 shared with none)
  assert first["details"]["yarn"][0]["answers"] == first["details"]["none"][0]["answers"]
  calls.clear()
  resumed = passkey.run(_config(samples=3), str(tmp_path / "a"), model=model, print_fn=lambda s: None)
  assert len(calls) == 3  # the third prompt of none at 256 and 512, of yarn at 512
  calls.clear()
  fresh = passkey.run(_config(samples=3), str(tmp_path / "b"), model=model, print_fn=lambda s: None)
  assert len(calls) == 9  # none 3 + 3, yarn 3 at 512
  assert resumed == fresh
  for label in ("none", "yarn"):
    for r_first, r_resumed in zip(first["details"][label], resumed["details"][label]):
      assert r_resumed["answers"][:2] == r_first["answers"] and r_resumed["keys"][:2] == r_first["keys"]
  lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
  assert len(lines) == 9 and (tmp_path / "a" / "table.txt").exists()


def test_run_refuses_a_workdir_of_another_run(tmp_path):
  from lrjax import evaluate
  model = evaluate.load_model(_config())
  passkey.run(_config(lengths=(256,), samples=1, settings=("none",)), str(tmp_path), model=model,
              print_fn=lambda s: None)
  with pytest.raises(passkey.PasskeyError, match=r"holds a run with seed=42, not 7"):
    passkey.run(_config(lengths=(256,), samples=1, settings=("none",), seed=7), str(tmp_path), model=model,
                print_fn=lambda s: None)
  assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 1
