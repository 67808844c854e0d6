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


def test_metrics_writer_round_trip_and_append(tmp_path):
  path = tmp_path / "metrics.csv"
  with report.MetricsWriter(path) as w:
    w.write(0, {"loss": 2.5, "lr": 1e-5}, wall_time=100.0)
    w.write(10, {"loss": 1.25})
  with report.MetricsWriter(path) as w:  # a resumed run appends, header written once
    w.write(20, {"loss": 1.0})
  m = report.read_metrics(path)
  assert sorted(m) == ["loss", "lr"]
  np.testing.assert_array_equal(m["loss"][0], [0, 10, 20])
  np.testing.assert_array_equal(m["loss"][1], [2.5, 1.25, 1.0])
  np.testing.assert_array_equal(m["lr"][1], [1e-5])
  assert path.read_text().count("step,name,value,wall_time") == 1
  bad = tmp_path / "bad.csv"
  bad.write_text("x,y\n")
  with pytest.raises(ValueError, match="not a metrics CSV"):
    report.read_metrics(bad)
  bad.write_text("step,name,value,wall_time\n3,loss,abc,1\n")
  with pytest.raises(ValueError, match=r"bad.csv:2: malformed metrics row"):
    report.read_metrics(bad)
