"""What a training run records: metrics.csv, TensorBoard events (tensorboardX) and loss.png, from process 0.

Paths go through etils.epath (a gs:// workdir works): the CSV is rewritten whole and atomically at every log,
so a resumed run keeps exactly the rows up to its restored step; TensorBoard events are written locally and
copied into the workdir when the log closes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile

import numpy as np
import tensorboardX
from etils import epath

from lrjax import report

CSV_FIELDS = ("step", "stage", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu", "skipped",
              "wall_time")


def _read_rows(path: epath.Path, up_to: int) -> list[dict]:
  if not path.exists():
    return []
  return [r for r in csv.DictReader(io.StringIO(path.read_text())) if int(r["step"]) <= up_to]


class MetricsLog:
  """metrics.csv plus TensorBoard scalars in `workdir` (create on process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / "metrics.csv"
    self.rows = _read_rows(self.path, resume_step)  # later rows will be recomputed
    self._local = not str(workdir).partition("://")[1]
    self._tb_dir = os.path.join(workdir, "tensorboard") if self._local else tempfile.mkdtemp(prefix="lrjax-tb-")
    self._tb = tensorboardX.SummaryWriter(self._tb_dir, flush_secs=30)
    self._flush()

  def _flush(self) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(self.rows)
    report.write_text(self.path, out.getvalue())

  def write(self, row: dict) -> None:
    """One step's row (missing fields stay empty); TensorBoard gets train/{loss,grad_norm,lr} and
    perf/{tokens_per_s,mfu}."""
    self.rows.append({k: row.get(k, "") for k in CSV_FIELDS})
    self._flush()
    step = int(row["step"])
    for group, keys in (("train", ("loss", "grad_norm", "lr")), ("perf", ("tokens_per_s", "mfu"))):
      for k in keys:
        value = row.get(k)
        if value not in ("", None) and math.isfinite(float(value)):
          self._tb.add_scalar(f"{group}/{k}", float(value), step)

  def close(self) -> None:
    self._tb.close()
    if not self._local:  # copy the event files into the remote workdir
      remote = self.workdir / "tensorboard"
      remote.mkdir(parents=True, exist_ok=True)
      for name in os.listdir(self._tb_dir):
        (remote / name).write_bytes(epath.Path(self._tb_dir, name).read_bytes())


def plot_metrics(workdir: str) -> str:
  """workdir/loss.png: training loss (bits/token) against step from metrics.csv, stage starts marked."""
  rows = _read_rows(epath.Path(workdir) / "metrics.csv", up_to=1 << 62)
  steps = np.array([int(r["step"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows]) / math.log(2)
  series = {"per step": (steps, loss)}
  if len(loss) >= 20:
    k = max(len(loss) // 50, 5)
    series[f"mean of {k}"] = (steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"))
  stages = np.array([int(r["stage"]) for r in rows])
  path = os.path.join(workdir, "loss.png")
  report.line_plot(path, series, xlabel="step", ylabel="training loss (bits/token)", markers=False,
                   vlines=list(steps[np.flatnonzero(np.diff(stages)) + 1]))
  return path
