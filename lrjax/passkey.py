"""Passkey retrieval (Mohtashami & Jaggi format, as LongRoPE evaluates it), scored by greedy decoding.

A needle "The pass key is K. Remember it. K is the pass key." sits at a uniformly random depth inside
repeated filler; the model must complete "The pass key is" with K. The "python" format says the same thing
in code, for models trained on source code (the built-in model); the scoring is identical.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np

from lrjax import answers
from lrjax import decode
from lrjax import evaluate
from lrjax import model as model_lib
from lrjax import report
from lrjax import rope as rope_lib
from lrjax import schema

FORMATS = {
    "paper": dict(
        intro=("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there."),
        filler="The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
        needle="The pass key is {key}. Remember it. {key} is the pass key.",
        question="What is the pass key? The pass key is",
        joiner="\n"),
    "python": dict(
        intro="# There is an important value hidden inside a lot of irrelevant code. Remember it.",
        filler="x = y + 1\nif x > y:\n    y = x\n",
        needle="PASS_KEY = {key}  # remember this value\n",
        question="assert PASS_KEY ==",
        joiner="\n"),
}


@dataclasses.dataclass(frozen=True)
class Sample:
  tokens: np.ndarray  # i32[t], the prompt
  key: int
  depth: float  # needle position as a fraction of the filler


def build_sample(tokenizer, target_tokens: int, rng: np.random.Generator, fmt: str = "paper") -> Sample:
  """One prompt of about `target_tokens` tokens with the needle placed uniformly in the filler.

  The filler budget is calibrated on the tokenizer (the paper's fixed 3.65 characters per token only holds
  for the LLaMA tokenizer), so byte-level and sentencepiece prompts both come out at the target length.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown passkey format {fmt!r}; expected one of {', '.join(FORMATS)}")
  f = FORMATS[fmt]
  key = int(rng.integers(1, 50001))
  needle = f["needle"].format(key=key)
  fixed = len(_encode(tokenizer, f["joiner"].join([f["intro"], "", needle, "", f["question"]])))
  probe = f["filler"] * 64
  chars_per_token = len(probe) / len(_encode(tokenizer, probe))
  budget = max(0, int((target_tokens - fixed) * chars_per_token))
  filler = (f["filler"] * (budget // len(f["filler"]) + 1))[:budget]
  split = int(rng.integers(0, budget + 1))
  text = f["joiner"].join([f["intro"], filler[:split], needle, filler[split:], f["question"]])
  tokens = np.asarray(_encode(tokenizer, text), np.int32)
  # BOS exactly when the checkpoint's tokenizer adds it to model input (SmolLM2 has a BOS id but adds none).
  if getattr(tokenizer, "add_bos", getattr(tokenizer, "bos_id", None) is not None):
    tokens = np.concatenate([[tokenizer.bos_id], tokens]).astype(np.int32)
  return Sample(tokens=tokens, key=key, depth=split / max(budget, 1))


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text))


def score(continuation: str, key: int) -> bool:
  """Correct when the first integer in the continuation is the key (the official scoring)."""
  match = re.search(r"\d+", continuation)
  return match is not None and int(match.group()) == key


def accuracy(config: model_lib.ModelConfig, params: dict, tokenizer, *, lengths: list[int],
             scaling_for_length, samples: int = 10, seed: int = 42, fmt: str = "paper",
             max_new_tokens: int = 10, policy: str = "total_length", prefill_chunk: int | None = None,
             progress=None, store: answers.Store | None = None, label: str = "") -> list[dict]:
  """Passkey accuracy per length.

  Args:
    scaling_for_length: callable length -> RopeScaling (or None for the checkpoint's own).
    samples: prompts per length; each length reseeds its generator with (seed, length), so results do not
      depend on which other lengths run.
    prefill_chunk: tokens per prefill step (lrjax.decode.greedy_generate); None: one chunk.
    progress: optional callable(done, total) for progress display.
    store: optional per-prompt records (lrjax.answers): a prompt already answered with the same RoPE arrays is
      read back instead of decoded (a resumed run; settings equal at a length share answers); new answers are
      appended, tagged with `label`.
  Returns:
    [{"length", "accuracy", "correct", "samples", "keys", "answers"}] in the order of `lengths`.
  """
  rows = []
  total, done = len(lengths) * samples, 0
  for length in lengths:
    rng = np.random.default_rng([seed, length])
    scaling: rope_lib.RopeScaling | None = scaling_for_length(length)
    correct, keys, replies = 0, [], []
    for index in range(samples):
      sample = build_sample(tokenizer, length, rng, fmt)
      key = None
      if store is not None:
        t = int(sample.tokens.size)
        seq_lens = [t + max_new_tokens] if policy == "total_length" else [t, t + max_new_tokens]
        key = answers.record_key(f"passkey_{fmt}", length, None, index,
                                 answers.rope_digest(config, scaling, seq_lens))
      record = store.get(key) if store is not None else None
      if record is not None and record["key"] == sample.key:
        answer = record["answer"]
      else:
        began = time.perf_counter()
        out = decode.greedy_generate(config, params, sample.tokens[None], max_new_tokens, scaling=scaling,
                                     policy=policy, prefill_chunk=prefill_chunk)
        answer = tokenizer.decode([int(x) for x in out[0]])
        if store is not None:
          store.add([{"task": key[0], "length": length, "depth": None, "index": index, "rope": key[4],
                      "setting": label, "key": sample.key, "needle_depth": sample.depth, "answer": answer,
                      "correct": score(answer, sample.key), "prompt_tokens": int(sample.tokens.size),
                      "seconds": round(time.perf_counter() - began, 3)}])
      correct += score(answer, sample.key)
      keys.append(sample.key)
      replies.append(answer)
      done += 1
      if progress is not None:
        progress(done, total)
    rows.append({"length": length, "accuracy": correct / samples, "correct": correct, "samples": samples,
                 "keys": keys, "answers": replies})
  return rows


# ----------------------------------------------------------------------------------------------------------
# The passkey experiment (experiments/passkey.py, configs/passkey.py): settings x lengths -> accuracy table.

def _schema():
  return {"model": schema.STR, "tokenizer": schema.STR, "dtype": schema.STR, "attention": schema.STR,
          "block_q": schema.POSITIVE_INT, "block_k": schema.POSITIVE_INT, "sliding_window": schema.Key(int, minimum=-1),
          "original_length": schema.NON_NEGATIVE_INT,
          "lengths": schema.SEQUENCE, "settings": schema.SEQUENCE, "samples": schema.POSITIVE_INT, "seed": schema.INT,
          "format": schema.Key(str, choices=tuple(FORMATS)), "max_new_tokens": schema.POSITIVE_INT,
          "policy": schema.Key(str, choices=decode.POLICIES), "prefill_chunk": schema.NON_NEGATIVE_INT,
          "progress": schema.BOOL}


# The keys an answer depends on besides its prompt and RoPE arrays: a workdir holding other values is refused.
IDENTITY = ("model", "tokenizer", "dtype", "sliding_window", "original_length", "seed", "format", "max_new_tokens",
            "policy")


class PasskeyError(ValueError):
  """A passkey config that cannot run; the message names the problem."""


def run(config, workdir: str, *, model=None, print_fn=print) -> dict:
  """Passkey accuracy for every (setting, length): table.txt, results.json and passkey.png in `workdir`.

  Settings use lrjax.evaluate's grammar (none, yarn, a factor file, ...; derived methods take s = length / L).
  Every answer is appended to samples.jsonl as soon as it is scored (lrjax.answers), so a rerun with the same
  workdir decodes only the prompts that have no answer yet; settings whose RoPE arrays are equal at a length
  (every derived method within the original window) share answers. The tables are rewritten after every setting.
  """
  schema.check(config, _schema(), error=PasskeyError)
  if not workdir:
    raise PasskeyError("--workdir is required")
  model_config, params = model if model is not None else evaluate.load_model(config)
  if config.original_length:
    model_config = model_config.replace(original_max_position_embeddings=int(config.original_length))
  tokenizer = evaluate.load_tokenizer_for(config)
  settings = [evaluate.parse_setting(s, model_config) for s in config.settings]
  lengths = [int(n) for n in config.lengths]
  store = answers.Store(workdir, {k: config[k] for k in IDENTITY}, error=PasskeyError)
  rows, details = {}, {}
  with report.progress_bar(config.progress, total=len(settings) * len(lengths) * config.samples,
                           desc="passkey", unit="prompt") as bar:
    for setting in settings:
      bar.set_postfix_str(setting.label)
      out = accuracy(model_config, params, tokenizer, lengths=lengths, scaling_for_length=setting.scaling_at,
                     samples=config.samples, seed=config.seed, fmt=config.format,
                     max_new_tokens=config.max_new_tokens, policy=config.policy,
                     prefill_chunk=config.prefill_chunk or None, progress=lambda done, total: bar.update(1),
                     store=store, label=setting.label)
      rows[setting.label] = {r["length"]: r["accuracy"] for r in out}
      details[setting.label] = out
      _write(workdir, rows, details, lengths, model_config)
  text = report.format_table(list(rows), lengths, lambda r, n: rows[r][n], row_header="setting \\ length")
  print_fn(f"passkey accuracy ({config.samples} prompts per length, original window L = "
           f"{model_config.original_length}):\n{text}")
  return {"table": rows, "details": details}


def _write(workdir, rows, details, lengths, model_config) -> None:
  text = report.format_table(list(rows), lengths, lambda r, n: rows[r][n], row_header="setting \\ length")
  report.write_text(os.path.join(workdir, "table.txt"), f"original window L = {model_config.original_length}\n"
                    + text + "\n")
  report.write_json(os.path.join(workdir, "results.json"), {"table": rows, "details": details})
  report.line_plot(os.path.join(workdir, "passkey.png"),
                   {label: (lengths, [row[n] for n in lengths]) for label, row in rows.items()},
                   xlabel="prompt length (tokens)", ylabel="passkey accuracy", title="passkey retrieval", logx=True)
