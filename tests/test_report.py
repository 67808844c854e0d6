"""Report helpers: table layout, atomic CSV/JSON, PNG plots that decode, metrics log round trip."""

import csv
import json
import os

import numpy as np
import pytest

from lrjax import report


def test_format_number():
  assert [report.format_number(x) for x in (3.14159, 72.5449, 999.96, 1234.56, 2.5e7, None, float("nan"),
                                            float("inf"))] == ["3.142", "72.54", "1000", "1234.6", "2.500e+07",
                                                               "-", "-", "inf"]


def test_format_table_alignment_and_missing_cells():
  text = report.format_table(["none", "yarn"], [4096, 8192], {("none", 4096): 3.5, ("yarn", 8192): 12.25},
                             row_header="setting")
  lines = text.splitlines()
  assert lines[0].split() == ["setting", "4096", "8192"]
  assert lines[2].split() == ["none", "3.500", "-"]
  assert lines[3].split() == ["yarn", "-", "12.25"]
  assert len({len(line) for line in lines}) == 1  # every line padded to the same width
  assert set(lines[1]) <= {"-", " "}


def test_write_csv_and_json_atomically(tmp_path):
  path = tmp_path / "out" / "t.csv"
  report.write_csv(path, ["a", "b"], [[1, "x,y"], [2.5, "z"]])
  with open(path, newline="") as f:
    assert list(csv.reader(f)) == [["a", "b"], ["1", "x,y"], ["2.5", "z"]]
  jpath = tmp_path / "r.json"
  report.write_json(jpath, {"a": np.float32(1.5), "b": np.arange(3), "c": float("inf"), 4: [np.int64(2)]})
  assert json.loads(jpath.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": None, "4": [2]}
  # a failed write leaves the previous file intact and no temporary behind
  with pytest.raises(TypeError):
    report.write_json(jpath, {"bad": object()})
  assert json.loads(jpath.read_text())["a"] == 1.5
  assert sorted(os.listdir(tmp_path)) == ["out", "r.json"]


def _png_size(path):
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_pngs(tmp_path):
  report.perplexity_plot(tmp_path / "ppl.png", {"none": {4096: 3.2, 8192: 50.0, 16384: float("nan")},
                                                "yarn": {4096: 3.3, 8192: 3.1, 16384: 3.0}}, title="t")
  assert _png_size(tmp_path / "ppl.png") == (840, 540)
  report.line_plot(tmp_path / "curve.png", {"loss": ([0, 1, 2], [3.0, 2.0, 1.5])}, xlabel="step",
                   ylabel="loss")
  assert _png_size(tmp_path / "curve.png")[0] > 0
  import matplotlib.image as mpimg
  img = mpimg.imread(tmp_path / "ppl.png")
  assert img.std() > 0  # something was drawn


def test_heatmap_and_progress_bar(tmp_path, capsys):
  path = tmp_path / "grid.png"
  values = np.array([[100.0, 50.0, np.nan], [0.0, 25.0, 75.0]])
  report.heatmap(path, values, rows=["depth 0", "depth 1"], columns=[4096, 8192, 16384], xlabel="length")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with report.progress_bar(False, total=3) as bar:   # disabled: the same methods, no output
    bar.update(1)
    bar.set_postfix_str("x")
  assert capsys.readouterr().err == ""
  with report.progress_bar(True, total=3, desc="work") as bar:
    bar.update(3)
  assert "work" in capsys.readouterr().err
