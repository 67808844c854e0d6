"""The RULER experiment (experiments/ruler.py, configs/ruler.py): settings x lengths x tasks (x needle depths).

A config lists sweeps; each is a product of lengths, settings (lrjax.evaluate's grammar), tasks and, for a
needle-in-a-haystack grid, needle depths, with a number of samples per cell. Sample i of (task, length, depth)
is generated from (seed, task, length, i) alone and is the same prompt under every setting; its prompt plus the
task's generated tokens fill exactly `length` tokens (RULER's rule, template included). The model answers
greedily (lrjax.decode, the factor set chosen per sequence by `policy`), stopping at the tokenizer's EOS, and the
answer is scored as RULER does (lrjax.ruler.scoring). Every answer is recorded as soon as it is scored and every
cell rewrites the tables (lrjax.ruler.results), so a killed run loses at most the batch in flight and a rerun
with the same workdir continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Callable

import numpy as np

from lrjax import answers, decode, evaluate, report, schema
from lrjax.ruler import prompts, results, scoring, sources, tasks
from lrjax.ruler.prompts import RulerError

SWEEP = {"lengths": schema.SEQUENCE, "settings": schema.SEQUENCE, "tasks": schema.SEQUENCE,
         "samples": schema.POSITIVE_INT, "depths": schema.SEQUENCE}
SCHEMA = {
    "model": schema.STR, "tokenizer": schema.STR, "dtype": schema.STR, "attention": schema.STR,
    "block_q": schema.POSITIVE_INT, "block_k": schema.POSITIVE_INT, "sliding_window": schema.Key(int, minimum=-1),
    "original_length": schema.NON_NEGATIVE_INT, "sweeps": schema.Each(SWEEP, minimum=1),
    "seed": schema.NON_NEGATIVE_INT, "template": schema.Key(str, choices=prompts.TEMPLATE_CHOICES),
    "haystack": schema.STR, "squad": schema.STR, "hotpotqa": schema.STR, "max_new_tokens": schema.NON_NEGATIVE_INT,
    "batch_size": schema.POSITIVE_INT, "policy": schema.Key(str, choices=decode.POLICIES), "progress": schema.BOOL,
}
# The keys a recorded answer depends on besides its cell: a workdir holding other values is refused.
IDENTITY = ("model", "tokenizer", "dtype", "sliding_window", "original_length", "seed", "template", "haystack",
            "squad", "hotpotqa", "max_new_tokens", "policy")
QA_FILES = {"squad": "qa_1", "hotpotqa": "qa_2"}  # config key -> the task that reads it


@dataclasses.dataclass(frozen=True)
class Cell:
  """`samples` prompts of `task` at `length` (needle at `depth`; None: RULER's random depths) under `setting`.

  rope fingerprints the RoPE arrays the decode uses: cells with equal arrays share their answers.
  """
  setting: evaluate.Setting
  task: tasks.TaskConfig
  length: int
  depth: float | None
  samples: int
  rope: str

  def key(self, index: int) -> answers.Key:
    return answers.record_key(self.task.name, self.length, self.depth, index, self.rope)


def _check_sweep(sweep, where: str) -> list[tasks.TaskConfig]:
  lengths = tuple(sweep.lengths)
  if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 2 for n in lengths):
    raise RulerError(f"config key {where}.lengths must be integers >= 2, got {lengths}")
  if not tuple(sweep.settings):
    raise RulerError(f"config key {where}.settings is empty")
  try:
    chosen = tasks.select(list(sweep.tasks))
    if sweep.depths:
      tasks.needle_grid(lengths, list(sweep.depths))
  except RulerError as e:
    raise RulerError(f"config key {where}: {e}") from None
  several = [t.name for t in chosen if sweep.depths and not tasks.takes_depth(t)]
  if several:
    raise RulerError(f"config key {where}.depths: task {several[0]} has several needles; a needle grid takes "
                     "single-needle tasks (niah_single_1..3, niah_multikey_2/3)")
  return chosen


def validate_config(config) -> None:
  """Unknown, missing or mistyped keys, then the checks across keys: one RulerError line each."""
  schema.check(config, SCHEMA, error=RulerError)
  chosen = {t.name: t for j, s in enumerate(config.sweeps) for t in _check_sweep(s, f"config.sweeps[{j}]")}
  essay = [name for name, t in chosen.items() if tasks.needs_documents(t)]
  if essay and not config.haystack:
    raise RulerError(f"task {essay[0]} has an essay haystack: set config.haystack to a data source "
                     "(e.g. builtin:test, a .jsonl file or a folder)")
  if config.haystack and not essay:
    raise RulerError(f"config.haystack is set ({config.haystack!r}) but no task has an essay haystack; set it to ''")
  for key, task in QA_FILES.items():
    if task in chosen and not config[key]:
      raise RulerError(f"task {task} needs config.{key}: a {key} JSON/JSONL file (see lrjax.ruler.sources)")
    if config[key] and task not in chosen:
      raise RulerError(f"config.{key} is set but no sweep runs {task}; set it to ''")


def _rope_key(model_config, scaling, length: int, prompt_length: int, policy: str) -> str:
  """The RoPE arrays the decode of a `length`-token sequence uses (at the prompt and final lengths under
  reprefill, where the set may switch in between)."""
  return answers.rope_digest(model_config, scaling, [length] if policy == "total_length" else [prompt_length, length])


def plan(config, model_config) -> list[Cell]:
  """The cells of every sweep, merged (a cell in several sweeps runs its largest sample count), ordered by
  length, then task, then depth, so a sample is built once for all its settings and short lengths finish first."""
  planned, specs = {}, {}
  for sweep in config.sweeps:
    settings = [evaluate.parse_setting(s, model_config) for s in sweep.settings]
    for setting in settings:
      if specs.setdefault(setting.label, setting.spec) != setting.spec:
        raise RulerError(f"settings {specs[setting.label]!r} and {setting.spec!r} share the label "
                         f"{setting.label!r}; use LABEL=SPEC")
    for task in tasks.select(list(sweep.tasks)):
      if config.max_new_tokens:
        task = dataclasses.replace(task, max_new_tokens=min(task.max_new_tokens, config.max_new_tokens))
      for n in (int(n) for n in sweep.lengths):
        for depth in [float(d) for d in sweep.depths] or [None]:
          for setting in settings:
            key = (setting.label, task.name, n, depth)
            samples = max(sweep.samples, planned[key].samples if key in planned else 0)
            planned[key] = Cell(setting, task, n, depth, samples, _rope_key(
                model_config, setting.scaling_at(n), n, n - task.max_new_tokens, config.policy))
  order = {name: i for i, name in enumerate(tasks.TASKS)}
  return sorted(planned.values(), key=lambda c: (c.length, order[c.task.name], -1.0 if c.depth is None else c.depth))


def _sampler(config, cells: list[Cell], tokenizer, format_prompt, add_bos) -> Callable[[Cell, int], tasks.Sample]:
  """sample(cell, index) -> the cell's prompt `index` (cached: every setting of a cell reads the same prompts).
  Builds the first prompt of every (task, length, depth) now, so a length a task cannot fit fails before any
  model call."""
  texts = sources.read_documents(config.haystack, max(c.length for c in cells)) if config.haystack else None
  records = {tasks.TASKS[task].params["dataset"]: sources.read_qa(config[key])
             for key, task in QA_FILES.items() if config[key]}
  by_name = {c.task.name: c.task for c in cells}

  @functools.lru_cache(maxsize=256)
  def build(task: str, length: int, depth: float | None, index: int) -> tasks.Sample:
    config_ = by_name[task]
    return tasks.generate(config_, tokenizer, length=length, seed=config.seed, index=index, depth=depth,
                          haystack=texts,
                          qa_records=records.get(config_.params.get("dataset")), format_prompt=format_prompt,
                          add_bos=add_bos)

  for task, length, depth in dict.fromkeys((c.task.name, c.length, c.depth) for c in cells):
    build(task, length, depth, 0)
  return lambda cell, index: build(cell.task.name, cell.length, cell.depth, index)


def _answer(model, tokenizer, cell: Cell, samples: list[tasks.Sample], policy: str) -> list[tuple[str, int]]:
  """Greedy answers of one batch of a cell's prompts: (text before the first EOS, tokens generated up to it)."""
  model_config, params = model
  eos = tokenizer.eos_id
  stop = None if eos is None else (lambda out: bool((out == eos).any(axis=1).all()))
  out = decode.greedy_generate(model_config, params, np.stack([s.tokens for s in samples]),
                               cell.task.max_new_tokens, scaling=cell.setting.scaling_at(cell.length),
                               policy=policy, stop=stop)
  replies = []
  for row in out:
    end = int(np.argmax(row == eos)) if eos is not None and (row == eos).any() else row.size
    replies.append((tokenizer.decode([int(t) for t in row[:end]]), min(end + 1, int(row.size))))
  return replies


def _header(config, model_config, template: str) -> dict:
  return {"config": json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config),
          "template": template,
          "model": {"vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
                    "num_layers": model_config.num_layers, "original_length": model_config.original_length,
                    "max_position_embeddings": model_config.max_position_embeddings,
                    "rope_theta": model_config.rope_theta}}


def run(config, workdir: str, *, model=None, print_fn: Callable[[str], None] = print) -> dict:
  """Scores every cell of `config` (configs/ruler.py) and writes the files of lrjax.ruler.results into `workdir`.

  Args:
    model: optional (ModelConfig, params) to use instead of loading config.model (tests, notebooks).
  Returns:
    {"table": {setting: {length: average}}, "tasks": {task: {setting: {length: mean}}}, "cells": [...],
     "files": {name: path}}; scores in percent, as RULER reports them.
  """
  validate_config(config)
  if not workdir:
    raise RulerError("--workdir is required")
  model_config, params = model if model is not None else evaluate.load_model(config)
  if config.original_length:  # an explicit original window overrides the checkpoint's
    model_config = model_config.replace(original_max_position_embeddings=int(config.original_length))
  tokenizer = evaluate.load_tokenizer_for(config)
  template, format_prompt, add_bos = prompts.prompt_format(config.template, tokenizer)
  cells = plan(config, model_config)
  sample = _sampler(config, cells, tokenizer, format_prompt, add_bos)
  store = answers.Store(workdir, {k: config[k] for k in IDENTITY}, error=RulerError)
  header = _header(config, model_config, template)
  # Prompt tokens to answer, each key once: cells whose RoPE arrays are equal share their samples.
  pending = {c.key(i): c.length for c in cells for i in range(c.samples) if store.get(c.key(i)) is None}
  files = {}
  with report.progress_bar(config.progress, total=sum(pending.values()), desc="ruler", unit="tok",
                           unit_scale=True) as bar:
    for k, cell in enumerate(cells):
      todo = [i for i in range(cell.samples) if store.get(cell.key(i)) is None]
      for start in range(0, len(todo), config.batch_size):
        batch = todo[start:start + config.batch_size]
        bar.set_postfix_str(f"{cell.setting.label} @ {cell.length} {cell.task.name} #{batch[0]}")
        batch_samples = [sample(cell, i) for i in batch]
        began = time.perf_counter()
        replies = _answer((model_config, params), tokenizer, cell, batch_samples, config.policy)
        seconds = (time.perf_counter() - began) / len(batch)
        store.add({"task": cell.task.name, "length": cell.length, "depth": cell.depth, "index": i,
                   "rope": cell.rope, "setting": cell.setting.label, "spec": cell.setting.spec,
                   "score": scoring.score(s, text), "prediction": text, "outputs": s.outputs,
                   "needle_depth": s.depth, "prompt_tokens": int(s.tokens.size), "new_tokens": new,
                   "seconds": round(seconds, 3)} for i, s, (text, new) in zip(batch, batch_samples, replies))
        bar.update(cell.length * len(batch))
      if todo and k + 1 < len(cells):  # the last cell's files are written below
        summary = results.Summary(cells, store)
        files.update(results.write_summary(workdir, summary, header))
        if cells[k + 1].length != cell.length:  # plots once per length: they take a second each
          files.update(results.write_plots(workdir, summary))
  summary = results.Summary(cells, store)
  files.update(results.write_summary(workdir, summary, header))
  files.update(results.write_plots(workdir, summary))
  print_fn(f"RULER ({template} prompts, original window L = {model_config.original_length}):\n"
           f"{summary.tables(markdown=False)}")
  out = summary.to_json()
  return {"table": {label: {n: v["mean"] for n, v in row.items()} for label, row in out["average"].items()},
          "tasks": {t: {label: {n: v["mean"] for n, v in row.items()} for label, row in by.items()}
                    for t, by in out["tasks"].items()},
          "cells": out["cells"], "files": files}
