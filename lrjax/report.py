"""What people read: text tables, CSV/JSON files, PNG plots, progress bars.

Every file is written to a temporary sibling and renamed into place, so an interrupted run never leaves a
half-written result over a good one. Plots use matplotlib's Agg backend (no display).

  format_table(rows, columns, cell)          aligned text table (rows: settings, columns: lengths)
  write_csv / write_json / write_text        atomic file writers
  line_plot(path, series, ...)               generic curves, optional log axes
  perplexity_plot(path, table)               perplexity vs evaluation length, log y
  heatmap(path, grid, ...)                   a 2-D grid of scores (length x depth, setting x length)
  progress_bar(enabled, ...)                 a tqdm bar for long work, or a silent stand-in
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath
from tqdm.auto import tqdm


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to a temp file beside `path`, fsyncs, then renames it over `path`: a reader (or a crash)
  sees the old file or the new one, never half of one. A non-local path (gs://...) is written through
  etils.epath, as one object (object stores replace whole objects atomically)."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if "://" in os.fspath(path):
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
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


@contextlib.contextmanager
def _png(path: str | os.PathLike, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any, Any]]:
  """(matplotlib, figure, axes) for one plot; on exit the figure goes to `path` as a PNG (atomically)."""
  import matplotlib  # here, not at the top: only plotting pays its import (~0.5 s), after choosing Agg
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=figsize, dpi=120)
  try:
    yield matplotlib, fig, ax
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
  finally:
    plt.close(fig)
  atomic_write(path, buf.getvalue())


def _labels(ax, xlabel: str, ylabel: str, title: str) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
              xlabel: str = "", ylabel: str = "", title: str = "", logx: bool | int = False, logy: bool = False,
              xticks: Sequence[float] | None = None, markers: bool = True, vlines: Sequence[float] = ()) -> None:
  """Curves {label: (xs, ys)} into a PNG. logx may be a base (2 for lengths). Non-finite points are skipped;
  vlines are dashed vertical markers (e.g. stage starts)."""
  with _png(path, (7, 4.5)) as (matplotlib, _, ax):
    for label, (xs, ys) in series.items():
      xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
      ok = np.isfinite(xs) & np.isfinite(ys)
      if logy:
        ok &= ys > 0
      ax.plot(xs[ok], ys[ok], marker="o" if markers else None, markersize=3.5, label=str(label))
    for x in vlines:
      ax.axvline(x, color="gray", ls="--", lw=0.8)
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
    _labels(ax, xlabel, ylabel, title)
    ax.grid(True, which="both", alpha=0.3)
    if series:
      ax.legend(fontsize=8)


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


def heatmap(path: str | os.PathLike, values: np.ndarray, *, rows: Sequence[Any], columns: Sequence[Any],
            xlabel: str = "", ylabel: str = "", title: str = "", vmin: float = 0.0, vmax: float = 100.0,
            fmt: str = "{:.0f}") -> None:
  """A PNG heat map of values f64[len(rows), len(columns)] (e.g. accuracy by needle depth x context length),
  each cell annotated; NaN cells stay blank. The figure grows with the labels, so long row names and a title
  over one or two columns are not clipped."""
  values = np.asarray(values, np.float64)
  row_labels = [str(r) for r in rows]
  column_labels = [_short_number(c) if isinstance(c, (int, np.integer)) else str(c) for c in columns]
  width = max(2.0 + 0.9 * len(columns) + 0.09 * max(map(len, row_labels), default=0), 0.1 * len(title) + 1.0)
  with _png(path, (width, 1.0 + 0.45 * len(rows))) as (_, fig, ax):
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), column_labels)
    ax.set_yticks(range(len(rows)), row_labels)
    for (i, j), v in np.ndenumerate(values):
      if np.isfinite(v):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7)
    _labels(ax, xlabel, ylabel, "")
    if title:  # over the figure, not the axes: the axes may be one column wide
      fig.suptitle(title)
    fig.colorbar(image, ax=ax)


class _NoBar:
  def update(self, n: int = 1) -> None:
    pass

  def set_postfix_str(self, text: str) -> None:
    pass

  def set_postfix(self, **kw) -> None:
    pass


@contextlib.contextmanager
def progress_bar(enabled: bool, **tqdm_kwargs) -> Iterator[Any]:
  """A tqdm bar (on stderr) for long work, or a do-nothing stand-in with the same methods when disabled."""
  if not enabled:
    yield _NoBar()
    return
  bar = tqdm(dynamic_ncols=True, file=sys.stderr, **tqdm_kwargs)
  try:
    yield bar
  finally:
    bar.close()
