"""RULER's scoring (scripts/eval/synthetic/constants.py) and the statistics of a table cell.

A prediction scores in percent: string_match_all is the share of the expected strings found in it, string_match_part
is 100 when any one is found (case-insensitive substrings, after RULER's clean-up). A task's score is the mean over
its samples; RULER's average is the mean over tasks. Standard errors: the sample standard deviation (ddof 1) over
sqrt(n) within a task, and sqrt(sum of the tasks' squared errors) / T for the average of T independent tasks.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from lrjax.ruler.prompts import RulerError
from lrjax.ruler.tasks import Sample


def postprocess(prediction: str) -> str:
  """RULER's prediction clean-up: strip, then control characters become newlines, strip again."""
  return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  """Percentage of references found (case-insensitive substring) in the prediction."""
  return 100.0 * sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
  """100 if any reference is found (case-insensitive substring) in the prediction, else 0."""
  return 100.0 * max(r.lower() in prediction.lower() for r in references)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(sample_or_metric: Sample | str, prediction: str, references: Sequence[str] | None = None) -> float:
  """RULER's score of one prediction in percent (the task score is the mean over samples, rounded to 2 places)."""
  if isinstance(sample_or_metric, Sample):
    metric, references = sample_or_metric.metric, sample_or_metric.outputs
  else:
    metric = sample_or_metric
  if metric not in METRICS:
    raise RulerError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
  if not references:
    raise RulerError("score needs references: pass a Sample, or a metric name and a non-empty references list")
  return METRICS[metric](postprocess(prediction), references)


def mean_stderr(scores: Sequence[float]) -> tuple[float | None, float | None]:
  """(mean, standard error of the mean) of per-sample scores; None where undefined (no scores; one score's error)."""
  x = np.asarray(scores, np.float64)
  if x.size == 0:
    return None, None
  return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None)


def average(cells: Sequence[tuple[float | None, float | None]]) -> tuple[float | None, float | None]:
  """RULER's average of per-task (mean, stderr) pairs: the mean of the means, and sqrt(sum stderr^2) / T.

  Tasks without a mean are left out; the error is None when any task included has none.
  """
  scored = [(m, e) for m, e in cells if m is not None]
  if not scored:
    return None, None
  errors = [e for _, e in scored]
  stderr = None if any(e is None for e in errors) else math.sqrt(sum(e * e for e in errors)) / len(scored)
  return float(np.mean([m for m, _ in scored])), stderr
