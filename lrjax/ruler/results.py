"""The files of a RULER run: tables, per-task CSVs, results.json and heat maps, rebuilt after every cell from
the per-prompt records (lrjax.answers: samples.jsonl and the run identity run.json, which make a run resumable):

  table.txt, table.md   the average over tasks (rows: settings, columns: lengths), one table per task, and one
                        depth x length table per (setting, task) of a needle grid; cells "mean ± standard error"
  tasks/TASK.csv        setting, spec, length, depth, samples, mean, stderr: one row per cell
  results.json          config, identity, the same numbers and every cell
  heatmap.png           average score, settings x lengths; heatmap_SETTING.png: tasks x lengths per setting
  needle_SETTING_TASK.png   a needle grid's accuracy, depth x length (the LWM / EasyContext figure)
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from lrjax import report
from lrjax.answers import RECORDS, Store, record_key
from lrjax.ruler import scoring
from lrjax.ruler.tasks import TASKS

Stats = tuple  # (mean | None, stderr | None)


def _cell_text(stats: Stats | None) -> str:
  if stats is None or stats[0] is None:
    return "-"
  return f"{stats[0]:.1f}" if stats[1] is None else f"{stats[0]:.1f} ± {stats[1]:.1f}"


def _markdown(rows: Sequence, columns: Sequence, cell, row_header: str) -> str:
  lines = ["| " + " | ".join([row_header] + [str(c) for c in columns]) + " |", "|---" * (len(columns) + 1) + "|"]
  lines += ["| " + " | ".join([str(r)] + [_cell_text(cell(r, c)) for c in columns]) + " |" for r in rows]
  return "\n".join(lines)


def slug(label: str) -> str:
  """A setting label as a file-name part: "search_16k/factors.json" -> "search_16k_factors.json"."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "setting"


class Summary:
  """The numbers of the current config's cells, from the records that exist so far.

  cells: objects with setting (.label, .spec), task (.name), length, depth, samples, rope (lrjax.ruler.run.Cell).
  """

  def __init__(self, cells: Sequence[Any], store: Store):
    self.cells = cells
    self.settings = list(dict.fromkeys(c.setting.label for c in cells))
    self.lengths = sorted({c.length for c in cells})
    names = {c.task.name for c in cells}
    self.tasks = [t for t in TASKS if t in names]
    self.scores = [[r["score"] for i in range(c.samples)
                    if (r := store.get(record_key(c.task.name, c.length, c.depth, i, c.rope))) is not None]
                   for c in cells]
    pooled = collections.defaultdict(list)  # (setting, task, length) -> scores over all depths
    for c, scores in zip(cells, self.scores):
      pooled[(c.setting.label, c.task.name, c.length)] += scores
    self.task = {k: scoring.mean_stderr(v) for k, v in pooled.items()}
    self.average, self.averaged = {}, {}
    for label in self.settings:
      for n in self.lengths:
        present = [t for t in self.tasks if self.task.get((label, t, n), (None,))[0] is not None]
        self.averaged[(label, n)] = present
        self.average[(label, n)] = scoring.average([self.task[(label, t, n)] for t in present])
    self.grid = {(c.setting.label, c.task.name, c.length, c.depth): scoring.mean_stderr(s)
                 for c, s in zip(cells, self.scores) if c.depth is not None}

  def average_note(self) -> str:
    """Which tasks the average table averages (and the cells that average fewer)."""
    sets = {k: tuple(v) for k, v in self.averaged.items() if v}
    if not sets:
      return "no task scored yet"
    common = collections.Counter(sets.values()).most_common(1)[0][0]
    others = [f"{label} @ {n}: {', '.join(s)}" for (label, n), s in sets.items() if s != common]
    return (f"mean over {len(common)} task(s): {', '.join(common)}" +
            (f"; other cells: {'; '.join(others)}" if others else ""))

  def tables(self, markdown: bool) -> str:
    """All the tables as text (aligned, or markdown)."""
    render = (lambda rows, cols, cell, header: _markdown(rows, cols, cell, header)) if markdown else (
        lambda rows, cols, cell, header: report.format_table(rows, cols, cell, row_header=header, fmt=_cell_text))
    title = (lambda s: f"### {s}") if markdown else (lambda s: s)
    header = "setting \\ length"
    parts = [title("RULER score (%), mean ± standard error"), self.average_note(),
             render(self.settings, self.lengths, lambda r, n: self.average.get((r, n)), header)]
    for t in self.tasks:
      parts += [title(f"{t} ({TASKS[t].metric})"),
                render(self.settings, self.lengths, lambda r, n, t=t: self.task.get((r, t, n)), header)]
    for label, t in dict.fromkeys((k[0], k[1]) for k in self.grid):
      depths = sorted({k[3] for k in self.grid if k[:2] == (label, t)})
      parts += [title(f"needle grid: {t}, {label} (rows: needle depth)"),
                render(depths, self.lengths, lambda d, n, label=label, t=t: self.grid.get((label, t, n, d)),
                       "depth \\ length")]
    return "\n\n".join(parts) + "\n"

  def to_json(self) -> dict:
    stats = lambda s, **extra: {"mean": s[0], "stderr": s[1], **extra}
    return {
        "average": {label: {n: stats(self.average[(label, n)], tasks=self.averaged[(label, n)])
                            for n in self.lengths} for label in self.settings},
        "tasks": {t: {label: {n: stats(self.task[(label, t, n)]) for n in self.lengths
                              if (label, t, n) in self.task} for label in self.settings} for t in self.tasks},
        "cells": [dict(setting=c.setting.label, spec=c.setting.spec, task=c.task.name, length=c.length,
                       depth=c.depth, samples_planned=c.samples, samples=len(s), rope=c.rope,
                       **stats(scoring.mean_stderr(s))) for c, s in zip(self.cells, self.scores)]}


def write_summary(workdir: str, summary: Summary, header: Mapping[str, Any]) -> dict[str, str]:
  """table.txt, table.md, tasks/*.csv and results.json; returns {name: path}."""
  files = {"table": os.path.join(workdir, "table.txt"), "markdown": os.path.join(workdir, "table.md"),
           "json": os.path.join(workdir, "results.json"), "records": os.path.join(workdir, RECORDS)}
  report.write_text(files["table"], summary.tables(markdown=False))
  report.write_text(files["markdown"], summary.tables(markdown=True))
  report.write_json(files["json"], {**header, **summary.to_json()})
  columns = ["setting", "spec", "length", "depth", "samples", "mean", "stderr"]
  for t in summary.tasks:
    rows = [[c.setting.label, c.setting.spec, c.length, c.depth, len(s), *scoring.mean_stderr(s)]
            for c, s in zip(summary.cells, summary.scores) if c.task.name == t]
    files[f"csv:{t}"] = os.path.join(workdir, "tasks", f"{t}.csv")
    report.write_csv(files[f"csv:{t}"], columns, [["" if v is None else v for v in row] for row in rows])
  return files


def _values(rows: Sequence, columns: Sequence, get) -> np.ndarray:
  return np.asarray([[np.nan if (s := get(r, c)) is None or s[0] is None else s[0] for c in columns]
                     for r in rows], np.float64)


def write_plots(workdir: str, summary: Summary) -> dict[str, str]:
  """The heat maps of the module docstring; returns {name: path}."""
  files = {}
  graded = [label for label in summary.settings
            if any(c.depth is None and c.setting.label == label for c in summary.cells)]
  if graded:
    files["heatmap"] = os.path.join(workdir, "heatmap.png")
    report.heatmap(files["heatmap"], _values(graded, summary.lengths, lambda r, n: summary.average.get((r, n))),
                   rows=graded, columns=summary.lengths, xlabel="length (tokens)", ylabel="setting",
                   title="RULER average (%)")
  for label in graded:
    name = f"heatmap_{slug(label)}"
    files[name] = os.path.join(workdir, f"{name}.png")
    report.heatmap(files[name], _values(summary.tasks, summary.lengths,
                                        lambda t, n: summary.task.get((label, t, n))),
                   rows=summary.tasks, columns=summary.lengths, xlabel="length (tokens)", ylabel="task",
                   title=label)
  for label, t in dict.fromkeys((k[0], k[1]) for k in summary.grid):
    depths = sorted({k[3] for k in summary.grid if k[:2] == (label, t)})
    name = f"needle_{slug(label)}_{t}"
    files[name] = os.path.join(workdir, f"{name}.png")
    report.heatmap(files[name], _values(depths, summary.lengths,
                                        lambda d, n: summary.grid.get((label, t, n, d))),
                   rows=[f"{100 * d:.0f}%" for d in depths], columns=summary.lengths, xlabel="length (tokens)",
                   ylabel="needle depth", title=f"{t}, {label}")
  return files
