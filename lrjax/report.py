"""What people read: text tables, CSV/JSON files, PNG plots, and a CSV metrics log (no TensorBoard needed).

Every file is written to a temporary sibling and renamed into place, so an interrupted run never leaves a
half-written result over a good one. Plots use matplotlib's Agg backend (no display).

  format_table(rows, columns, cell)          aligned text table (rows: settings, columns: lengths)
  write_csv / write_json / write_text        atomic file writers
  line_plot(path, series, ...)               generic curves, optional log axes
  perplexity_plot(path, table)               perplexity vs evaluation length, log y
  MetricsWriter(path).write(step, {...})     append-only long-format CSV: step, name, value, wall_time
  read_metrics(path)                         -> {name: (steps, values)} for plotting
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to a temp file beside `path`, fsyncs, then renames it over `path`: a reader (or a crash)
  sees the old file or the new one, never half of one."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, text.encode("utf-8"))


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Pretty JSON; numpy scalars/arrays become numbers/lists; NaN/inf become null (strict JSON)."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
      return clean(_json_default(x))
    return x
  write_text(path, json.dumps(clean(obj), indent=1, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  write_text(path, buf.getvalue())


def format_number(x: float | None) -> str:
  """Perplexity-friendly: 3.142, 72.54, 1234.5, 1.235e+07; None/NaN -> "-"."""
  if x is None or math.isnan(x):
    return "-"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  ax = abs(x)
  if ax >= 1e6 or (0 < ax < 1e-3):
    return f"{x:.3e}"
  if ax >= 1000:
    return f"{x:.1f}"
  return f"{x:#.4g}".rstrip(".")


def format_table(rows: Sequence[Any], columns: Sequence[Any], cell: Callable[[Any, Any], float | None] |
                 Mapping[tuple, float], *, row_header: str = "", fmt: Callable[[float | None], str] = format_number
                 ) -> str:
  """An aligned text table: one line per row, one column per column key.

  cell: fn(row, column) -> value, or a mapping {(row, column): value}; missing -> "-".
  """
  get = cell if callable(cell) else (lambda r, c: cell.get((r, c)))
  body = [[str(r)] + [fmt(get(r, c)) for c in columns] for r in rows]
  header = [row_header] + [str(c) for c in columns]
  widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
  render = lambda line: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in
                                  enumerate(zip(line, widths)))
  rule = "  ".join("-" * w for w in widths)
  return "\n".join([render(header), rule] + [render(line) for line in body])


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
              xlabel: str = "", ylabel: str = "", title: str = "", logx: bool | int = False, logy: bool = False,
              xticks: Sequence[float] | None = None, markers: bool = True) -> None:
  """Curves {label: (xs, ys)} into a PNG. logx may be a base (2 for lengths). Non-finite points are skipped."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  try:
    for label, (xs, ys) in series.items():
      xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
      ok = np.isfinite(xs) & np.isfinite(ys)
      if logy:
        ok &= ys > 0
      ax.plot(xs[ok], ys[ok], marker="o" if markers else None, markersize=3.5, label=str(label))
    if logx:
      ax.set_xscale("log", base=2 if logx is True else logx)
    if logy:
      ax.set_yscale("log")
      # Plain numbers (20, 30, 100) rather than 2x10^1: perplexities are read off these labels.
      ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
      ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False,
                                                                  minor_thresholds=(2, 0.4)))
    if xticks is not None:
      ax.set_xticks(list(xticks))
      ax.set_xticklabels([_short_number(x) for x in xticks])
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the given ticks on x
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
      ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if series:
      ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
  finally:
    plt.close(fig)
  atomic_write(path, buf.getvalue())


def _short_number(x: float) -> str:
  """4096 -> 4k, 131072 -> 128k, 1048576 -> 1M, 300 -> 300."""
  x = int(x)
  for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
    if x >= size and x % size == 0:
      return f"{x // size}{unit}"
  return str(x)


def perplexity_plot(path: str | os.PathLike, table: Mapping[str, Mapping[int, float]], *, title: str = "",
                    ylabel: str = "perplexity") -> None:
  """Perplexity vs evaluation length, one curve per setting: {setting: {length: ppl}}; log y, log2 x."""
  lengths = sorted({int(n) for row in table.values() for n in row})
  series = {name: (sorted(row), [row[n] for n in sorted(row)]) for name, row in table.items()}
  line_plot(path, series, xlabel="evaluation length (tokens)", ylabel=ylabel, title=title, logx=2, logy=True,
            xticks=lengths)


class MetricsWriter:
  """Append-only long-format CSV of scalars: step, name, value, wall_time (one row per scalar).

  Appends survive restarts (a resumed run continues the same file); each write is flushed.
  """

  HEADER = ("step", "name", "value", "wall_time")

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
    self._file = open(self.path, "a", newline="", encoding="utf-8")
    self._writer = csv.writer(self._file, lineterminator="\n")
    if new:
      self._writer.writerow(self.HEADER)
      self._file.flush()

  def write(self, step: int, metrics: Mapping[str, float], wall_time: float | None = None) -> None:
    wall_time = time.time() if wall_time is None else wall_time
    for name, value in metrics.items():
      self._writer.writerow((int(step), name, repr(float(value)), f"{wall_time:.3f}"))
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (steps i64[n], values f64[n])} from a MetricsWriter file, in file order."""
  out: dict[str, tuple[list, list]] = {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or tuple(header) != MetricsWriter.HEADER:
      raise ValueError(f"{path}: not a metrics CSV (expected header {','.join(MetricsWriter.HEADER)})")
    for lineno, row in enumerate(reader, 2):
      if not row:
        continue
      try:
        step, name, value = int(row[0]), row[1], float(row[2])
      except (ValueError, IndexError):
        raise ValueError(f"{path}:{lineno}: malformed metrics row {row!r}") from None
      steps, values = out.setdefault(name, ([], []))
      steps.append(step)
      values.append(value)
  return {k: (np.asarray(s, np.int64), np.asarray(v, np.float64)) for k, (s, v) in out.items()}
