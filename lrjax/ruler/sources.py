"""The user data RULER tasks read: essay haystacks from any lrjax.data source, and QA records from a JSON file.

Essay haystacks use the source's documents in order from the first (as RULER uses its essays), read until their
text reaches 16 characters per token of the longest prompt. A prompt takes its sentences from the start and needs
fewer characters than that, so it is the same whatever other lengths run; a shorter source is read whole and
cycled (lrjax.haystack.sentence_pieces).

QA records (tasks qa_1 and qa_2) come from a .json or .jsonl file, optionally gzipped, holding any of:
  lrjax's records   {"question": str, "answers": [str, ...], "context": str or "paragraphs": [str, ...]}, one per
                    line (.jsonl) or as a JSON list
  SQuAD             the official {"data": [{"paragraphs": [{"context", "qas": [...]}]}]} (v1.1 or v2.0); as RULER's
                    read_squad: unanswerable questions are dropped, answers are the answer texts
  HotpotQA          the official list of {"question", "answer", "context": [[title, [sentence, ...]], ...]}; as
                    RULER's read_hotpotqa: every context paragraph is gold, written "title\\nsentences"
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from etils import epath

from lrjax import data as data_lib
from lrjax.ruler import tasks
from lrjax.ruler.prompts import RulerError

CHARS_PER_TOKEN = 16  # characters of haystack text read per prompt token: more than any tokenizer needs


def read_documents(source: str, max_length: int) -> list[str]:
  """The texts of `source` (an lrjax.data source string) in order, until they reach CHARS_PER_TOKEN * max_length
  characters (read lazily: a large source is not read whole)."""
  texts, chars = [], 0
  try:
    for doc in data_lib.documents(source):
      if chars >= CHARS_PER_TOKEN * max_length:
        break
      texts.append(doc.text)
      chars += len(doc.text)
  except data_lib.DataError as e:
    raise RulerError(f"haystack {source!r}: {e}") from None
  if not any(t.strip() for t in texts):
    raise RulerError(f"haystack {source!r}: its documents hold no text")
  return texts


def _load(path: str) -> Any:
  """The parsed JSON (a list of records for .jsonl) of a possibly gzipped file on any epath filesystem."""
  try:
    raw = epath.Path(path).read_bytes()
    text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8")
  except FileNotFoundError:
    raise RulerError(f"QA file {path}: no such file") from None
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise RulerError(f"QA file {path}: unreadable ({type(e).__name__}: {e})") from None
  if not path.removesuffix(".gz").endswith(".jsonl"):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise RulerError(f"QA file {path}: malformed JSON ({e.msg} at line {e.lineno})") from None
  records = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise RulerError(f"QA file {path}:{lineno}: malformed JSON line ({e.msg})") from None
  return records


def _squad(content: dict) -> list[dict]:
  records = []
  for article in content["data"]:
    for paragraph in article.get("paragraphs", []):
      for qa in paragraph.get("qas", []):
        answers = list(dict.fromkeys(a["text"] for a in qa.get("answers", []) if a.get("text")))
        if not qa.get("is_impossible", False) and answers:
          records.append({"question": qa["question"], "answers": answers, "context": paragraph["context"]})
  return records


def _hotpotqa(item: dict) -> dict:
  return {"question": item["question"], "answers": [item["answer"]],
          "paragraphs": [f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]]}


def read_qa(path: str) -> list[dict]:
  """lrjax QA records (see tasks.generate's qa_records) from a file in any format of the module docstring."""
  content = _load(path)
  if isinstance(content, dict) and isinstance(content.get("data"), list):
    convert = lambda: _squad(content)
  elif isinstance(content, list):
    convert = lambda: [_hotpotqa(r) if isinstance(r, dict) and "answer" in r and isinstance(r.get("context"), list)
                       else r for r in content]
  else:
    raise RulerError(f"QA file {path}: expected a list of records or SQuAD's {{\"data\": [...]}}")
  try:
    records = convert()
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise RulerError(f"QA file {path}: not SQuAD, HotpotQA or lrjax records ({type(e).__name__}: {e})") from None
  if not records:
    raise RulerError(f"QA file {path}: no answerable questions")
  for i, record in enumerate(records):
    try:
      tasks.record_paragraphs(record, i)
    except RulerError as e:
      raise RulerError(f"QA file {path}: {e}") from None
  return records
