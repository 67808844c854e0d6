"""The RULER experiment (lrjax.ruler.run): end to end on the built-in model, resume, needle grids, statistics,
config errors and QA from user files.

Where a test needs known answers, an oracle stands in for the model: it reads the needle (or the question) from
the decoded prompt text, independently of the generator's bookkeeping, so the scores it earns are derived here.
"""

import csv
import json
import math
import os
import re

import numpy as np
import pytest

from configs import ruler as ruler_configs
from lrjax import cli, decode, ruler, tokenizers, weights
from lrjax.ruler import sources

BYTES = tokenizers.ByteTokenizer()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUAD = {"version": "v2.0", "data": [  # the official SQuAD 2.0 layout
    {"title": "Hamlet", "paragraphs": [{
        "context": "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601.",
        "qas": [{"id": "q1", "question": "Who wrote the play Hamlet?", "is_impossible": False, "answers": [
                    {"text": "William Shakespeare", "answer_start": 31}, {"text": "William Shakespeare",
                                                                          "answer_start": 31},
                    {"text": "Shakespeare", "answer_start": 39}]},
                {"id": "q2", "question": "Who wrote Macbeth?", "is_impossible": True, "answers": [],
                 "plausible_answers": [{"text": "William Shakespeare", "answer_start": 31}]}]}]},
    {"title": "Paris", "paragraphs": [{
        "context": "Paris is the capital and most populous city of France, on the river Seine.",
        "qas": [{"id": "q3", "question": "What is the capital of France?", "is_impossible": False,
                 "answers": [{"text": "Paris", "answer_start": 0}]}]}]},
    {"title": "Spider", "paragraphs": [{
        "context": "Spiders are arachnids with eight legs and chelicerae with fangs.",
        "qas": [{"id": "q4", "question": "How many legs does a spider have?", "is_impossible": False,
                 "answers": [{"text": "eight", "answer_start": 27}]}]}]},
]}
HOTPOTQA = [  # the official HotpotQA distractor layout
    {"_id": "h1", "question": "Which river flows through the capital of Egypt?", "answer": "the Nile",
     "type": "bridge", "supporting_facts": [["Cairo", 0], ["Nile", 0]],
     "context": [["Cairo", ["Cairo is the capital of Egypt.", " It lies on a river."]],
                 ["Nile", ["The Nile flows north through Cairo."]]]},
    {"_id": "h2", "question": "Which city hosts the Louvre?", "answer": "Paris", "type": "bridge",
     "supporting_facts": [["Louvre", 0]], "context": [["Louvre", ["The Louvre is a museum in Paris."]],
                                                      ["Seine", ["The Seine flows through Paris."]]]},
    {"_id": "h3", "question": "What do pandas eat?", "answer": "bamboo", "type": "bridge",
     "supporting_facts": [["Panda", 0]], "context": [["Panda", ["Giant pandas eat bamboo."]]]},
]


@pytest.fixture(scope="module")
def builtin():
  return weights.load_model("builtin", dtype="float32", attention="blockwise", block_q=512, block_k=512)


def _config(variant="", **updates):
  c = ruler_configs.get_config(variant)
  c.progress = False
  c.update(updates)
  return c


def _records(workdir):
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    return [json.loads(line) for line in f]


def _ruler_match(metric, prediction, references):
  """RULER's metrics (scripts/eval/synthetic/constants.py) on one prediction, after its clean-up."""
  p = re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
  found = [r.lower() in p for r in references]
  return 100.0 * (sum(found) / len(found) if metric == "string_match_all" else max(found))


class Killed(Exception):
  pass


def oracle(monkeypatch, *, depth_limit=1.0, answers=None, kill_at=None):
  """Replaces the model: answers the queried needle's value if the needle lies in the first `depth_limit` of the
  prompt text, else " none."; for QA prompts answers `answers[question]` (" none." if unknown). Returns the list
  of calls; raises Killed on call number `kill_at`."""
  calls = []

  def generate(config, params, prompt, max_new_tokens, **kw):
    calls.append(kw)
    if kill_at is not None and len(calls) == kill_at:
      raise Killed()
    rows = []
    for row in np.asarray(prompt):
      text = BYTES.decode(row)
      question = re.findall(r"Question: (.+?) Answer:\Z", text)
      if question:
        answer = (answers or {}).get(question[0], "none")
      else:
        key = re.findall(r"What is the special magic number for (\S+) mentioned", text)[-1]
        needle = re.search(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", text)
        answer = needle.group(1) if needle.start() <= depth_limit * len(text) else "none"
      ids = BYTES.encode(f" {answer}.")[:max_new_tokens]
      rows.append(np.pad(ids, (0, max_new_tokens - ids.size), constant_values=ord(" ")))
    return np.stack(rows)

  monkeypatch.setattr(decode, "greedy_generate", generate)
  return calls


@pytest.fixture(scope="module")
def family_run(builtin, tmp_path_factory):
  """The default config (one task per family, none and YaRN at 2048 tokens) plus qa_1 from a SQuAD file."""
  root = tmp_path_factory.mktemp("family")
  (root / "squad.json").write_text(json.dumps(SQUAD))
  c = _config(squad=str(root / "squad.json"))
  c.sweeps[0].tasks = c.sweeps[0].tasks + ("qa_1",)
  printed = []
  out = ruler.run(c, str(root / "out"), model=builtin, print_fn=printed.append)
  return c, str(root / "out"), out, printed


def test_one_task_per_family_on_the_builtin_model(family_run):
  c, workdir, out, printed = family_run
  names = ["niah_single_1", "niah_multikey_1", "vt", "cwe", "fwe", "qa_1"]
  assert {ruler.TASKS[t].family for t in names} == {"niah", "vt", "cwe", "fwe", "qa"}
  records = _records(workdir)
  assert sorted((r["task"], r["setting"]) for r in records) == sorted((t, s) for t in names for s in ("none", "yarn"))
  for r in records:
    assert 0.0 <= r["score"] <= 100.0
    assert r["score"] == _ruler_match(ruler.TASKS[r["task"]].metric, r["prediction"], r["outputs"])
    assert r["prompt_tokens"] + c.max_new_tokens == 2048 and r["new_tokens"] == c.max_new_tokens
  # Table: rows settings, columns lengths; the average is the mean of the six task means.
  assert set(out["table"]) == {"none", "yarn"} and all(list(row) == [2048] for row in out["table"].values())
  for setting in ("none", "yarn"):
    mean = np.mean([r["score"] for r in records if r["setting"] == setting])
    assert out["table"][setting][2048] == pytest.approx(mean)
  for name in ["table.txt", "table.md", "results.json", "run.json", "heatmap.png", "heatmap_none.png",
               "heatmap_yarn.png"] + [f"tasks/{t}.csv" for t in names]:
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "tasks", "vt.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["setting"], r["length"], r["samples"]) for r in rows] == [("none", "2048", "1"), ("yarn", "2048", "1")]
  lines = open(os.path.join(workdir, "table.txt")).read().splitlines()
  assert lines[0] == "RULER score (%), mean ± standard error" and lines[4].split() == ["setting", "\\", "length",
                                                                                       "2048"]
  assert [line.split()[0] for line in lines[6:8]] == ["none", "yarn"]
  assert "| setting \\ length | 2048 |" in open(os.path.join(workdir, "table.md")).read()
  assert printed and "niah_single_1 (string_match_all)" in printed[0]


def test_resume_skips_finished_samples(builtin, tmp_path, monkeypatch):
  c = _config(haystack="", sweeps=[ruler_configs.sweep([1024], ["none"], ["niah_single_1"], 3)])
  workdir = str(tmp_path / "out")
  oracle(monkeypatch, kill_at=3)
  with pytest.raises(Killed):
    ruler.run(c, workdir, model=builtin, print_fn=lambda s: None)
  assert [r["index"] for r in _records(workdir)] == [0, 1]
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    f.write('{"task": "niah_single_1", "length": 10')  # a record torn by the kill
  calls = oracle(monkeypatch)
  out = ruler.run(c, workdir, model=builtin, print_fn=lambda s: None)
  assert len(calls) == 1 and [r["index"] for r in _records(workdir)] == [0, 1, 2]
  assert out["table"]["none"][1024] == 100.0
  # Rerun: nothing left; more samples: only the new one; a setting with the same RoPE arrays: nothing.
  c.sweeps[0].samples = 4
  c.sweeps[0].settings = ("none", "yarn:1")
  calls = oracle(monkeypatch)
  out = ruler.run(c, workdir, model=builtin, print_fn=lambda s: None)
  assert len(calls) == 1 and out["table"] == {"none": {1024: 100.0}, "yarn:1": {1024: 100.0}}
  # The same records as a run that was never interrupted.
  fresh = str(tmp_path / "fresh")
  oracle(monkeypatch)
  ruler.run(c, fresh, model=builtin, print_fn=lambda s: None)
  strip = lambda rs: sorted((r["index"], r["prediction"], r["outputs"], r["needle_depth"]) for r in rs)
  assert strip(_records(fresh)) == strip(_records(workdir))
  c.seed = 7
  with pytest.raises(ruler.RulerError, match=r"holds a run with seed=42, not 7"):
    ruler.run(c, workdir, model=builtin)


def test_needle_grid_writes_its_heat_map(builtin, tmp_path, monkeypatch):
  c = _config("tiny_grid")
  c.sweeps[0].samples = 2
  oracle(monkeypatch, depth_limit=0.75)  # finds needles in the first three quarters of the prompt only
  out = ruler.run(c, str(tmp_path), model=builtin, print_fn=lambda s: None)
  assert os.path.getsize(tmp_path / "needle_none_niah_single_1.png") > 0
  assert not (tmp_path / "heatmap.png").exists()  # no RULER-style cells to average
  cells = {(cell["length"], cell["depth"]): cell for cell in out["cells"]}
  assert sorted(cells) == [(n, d) for n in (1024, 2048) for d in (0.0, 0.5, 1.0)]
  for (n, d), cell in cells.items():
    assert cell["samples"] == 2 and cell["mean"] == (0.0 if d == 1.0 else 100.0) and cell["stderr"] == 0.0
  for r in _records(str(tmp_path)):
    assert abs(r["needle_depth"] - r["depth"]) < 0.15  # the achieved depth: the sentence boundary nearest
  text = (tmp_path / "table.txt").read_text()
  assert "needle grid: niah_single_1, none (rows: needle depth)" in text
  assert re.search(r"\n1\.0\s+0\.0 ± 0\.0\s+0\.0 ± 0\.0\n", text)


def test_standard_errors_by_hand():
  assert ruler.mean_stderr([100.0, 0.0, 100.0, 100.0]) == (75.0, 25.0)  # sd = sqrt((3 * 25^2 + 75^2) / 3) = 50
  assert ruler.mean_stderr([40.0]) == (40.0, None) and ruler.mean_stderr([]) == (None, None)
  mean, err = ruler.average([(75.0, 25.0), (25.0, 25.0)])
  assert mean == 50.0 and err == pytest.approx(math.sqrt(625 + 625) / 2)
  assert ruler.average([(75.0, 25.0), (50.0, None), (None, None)]) == (62.5, None)


def test_qa_from_user_files(builtin, tmp_path, monkeypatch):
  (tmp_path / "squad.json").write_text(json.dumps(SQUAD))
  (tmp_path / "hotpot.json").write_text(json.dumps(HOTPOTQA))
  (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sources.read_qa(str(tmp_path /
                                                                                                "hotpot.json"))))
  squad = sources.read_qa(str(tmp_path / "squad.json"))
  assert squad == [  # the unanswerable question dropped, repeated answers once
      {"question": "Who wrote the play Hamlet?", "answers": ["William Shakespeare", "Shakespeare"],
       "context": SQUAD["data"][0]["paragraphs"][0]["context"]},
      {"question": "What is the capital of France?", "answers": ["Paris"],
       "context": SQUAD["data"][1]["paragraphs"][0]["context"]},
      {"question": "How many legs does a spider have?", "answers": ["eight"],
       "context": SQUAD["data"][2]["paragraphs"][0]["context"]}]
  hotpot = sources.read_qa(str(tmp_path / "hotpot.json"))
  assert hotpot[0] == {"question": "Which river flows through the capital of Egypt?", "answers": ["the Nile"],
                       "paragraphs": ["Cairo\nCairo is the capital of Egypt. It lies on a river.",
                                      "Nile\nThe Nile flows north through Cairo."]}
  assert sources.read_qa(str(tmp_path / "mine.jsonl")) == hotpot
  # The oracle knows two of the three answers: scores 100, 100, 0 -> mean 66.7, se = 57.74 / sqrt(3).
  oracle(monkeypatch, answers={"Which river flows through the capital of Egypt?": "the Nile",
                               "Which city hosts the Louvre?": "It is Paris"})
  c = _config(haystack="", hotpotqa=str(tmp_path / "mine.jsonl"),
              sweeps=[ruler_configs.sweep([1024], ["none"], ["qa_2"], 3)])
  out = ruler.run(c, str(tmp_path / "out"), model=builtin, print_fn=lambda s: None)
  (cell,) = out["cells"]
  assert [r["score"] for r in _records(str(tmp_path / "out"))] == [100.0, 100.0, 0.0]
  assert cell["mean"] == pytest.approx(200 / 3) and cell["stderr"] == pytest.approx(100 / math.sqrt(3) / math.sqrt(3))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"question": "q", "answers": []}]))
  with pytest.raises(ruler.RulerError, match=r"QA file .*bad.json: qa_records\[0\]: 'answers' must be"):
    sources.read_qa(str(bad))


def _sweep(**kw):
  return [ruler_configs.sweep(**dict(dict(lengths=[2048], settings=["none"], tasks=["vt"], samples=1), **kw))]


@pytest.mark.parametrize("updates, message", [
    (dict(foo=1), r"unknown config key config\.foo \(nothing reads it\)"),
    (dict(sweeps=_sweep(tasks=["niah_single_9"])), r"config key config\.sweeps\[0\]: unknown RULER task\(s\) "
                                                   r"'niah_single_9'"),
    (dict(sweeps=_sweep(tasks=["niah_multikey_1"], depths=[0.5])), r"task niah_multikey_1 has several needles"),
    (dict(sweeps=_sweep(depths=[1.5])), r"needle depths must be fractions in \[0, 1\]"),
    (dict(sweeps=_sweep(lengths=[1])), r"config\.sweeps\[0\]\.lengths must be integers >= 2"),
    (dict(sweeps=_sweep(settings=[])), r"config\.sweeps\[0\]\.settings is empty"),
    (dict(sweeps=[]), r"config key config\.sweeps must be a list of at least 1"),
    (dict(haystack="", sweeps=_sweep(tasks=["niah_single_2"])), r"task niah_single_2 has an essay haystack"),
    (dict(sweeps=_sweep()), r"config\.haystack is set \('builtin:test'\) but no task has an essay haystack"),
    (dict(haystack="", sweeps=_sweep(tasks=["qa_1"])), r"task qa_1 needs config\.squad"),
    (dict(haystack="", hotpotqa="x.json", sweeps=_sweep()), r"config\.hotpotqa is set but no sweep runs qa_2"),
    (dict(template="llama"), r"config key config\.template must be one of 'auto', 'plain', 'chat'"),
])
def test_config_errors_are_one_line(updates, message):
  c = _config(**{k: v for k, v in updates.items() if k != "foo"})
  if "foo" in updates:
    c.foo = 1
  with pytest.raises(ruler.RulerError, match=message) as info:
    ruler.validate_config(c)
  assert "\n" not in str(info.value)


def test_plan_errors_are_one_line(builtin, tmp_path):
  c = _config(haystack="", sweeps=_sweep(settings=["a=none", "a=yarn"]))
  with pytest.raises(ruler.RulerError, match=r"settings 'a=none' and 'a=yarn' share the label 'a'"):
    ruler.run(c, str(tmp_path), model=builtin)
  c = _config(haystack="", sweeps=_sweep(lengths=[900]))
  with pytest.raises(ruler.LengthError, match=r"vt: length 900 is too short"):  # before any model call
    ruler.run(c, str(tmp_path), model=builtin)


def test_command_line_reports_a_bad_task_in_one_line(capsys):
  from experiments import ruler as experiment
  with pytest.raises(SystemExit) as exit_info:
    cli.main(experiment.run, default_config="configs/ruler.py",
             argv=["--config.sweeps[0].tasks=('niah_single_1', 'needle')", "--workdir=/nonexistent"])
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 1 and len(err) == 1
  assert err[0].startswith("error: config key config.sweeps[0]: unknown RULER task(s) 'needle'")


@pytest.mark.parametrize("variant", ["", "tiny_grid", "smollm2", "smollm2_16k", "smollm2_grid"])
def test_shipped_configs_validate(variant):
  c = ruler_configs.get_config(variant)
  ruler.validate_config(c)
  tasks = {t for s in c.sweeps for t in s.tasks}
  if variant == "smollm2":  # every synthetic family inside the window, the two NIAH tasks beyond it
    assert {ruler.TASKS[t].family for t in tasks} == {"niah", "vt", "cwe", "fwe"} and len(tasks) == 11
    assert [(s.lengths, s.settings) for s in c.sweeps] == [
        ((4096, 8192), ("none", "yarn")), ((16384,), ("none", "yarn", ruler_configs.LONGROPE)),
        ((4096, 8192), (ruler_configs.LONGROPE,))]
  with pytest.raises(ValueError, match="unknown ruler config variant 'nope'"):
    ruler_configs.get_config("nope")
