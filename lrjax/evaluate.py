"""The perplexity-vs-length experiment: settings x lengths (x sources) -> table, CSV, JSON and plot.

Rows are RoPE settings (none, the checkpoint's own, PI/NTK/YaRN/Llama 3 derived per length from the model's
original window, dynamic NTK, factor files), columns are evaluation lengths; every cell is one
lrjax.perplexity.perplexity call. Outputs are rewritten after every cell, so an interrupted run keeps what it
finished. The config is configs/evaluate.py; `SCHEMA` is its declaration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import jax
from etils import epath

from lrjax import data as data_lib
from lrjax import factors as factors_lib
from lrjax import model as model_lib
from lrjax import report
from lrjax import rope as rope_lib
from lrjax import schema
from lrjax import sharding as sharding_lib
from lrjax import weights
from lrjax.perplexity import (PROTOCOLS, SHORT_DOCUMENT_POLICIES, EvalError, count_windows, perplexity,
                              sample_documents)

DERIVED_METHODS = {"pi": "linear", "linear": "linear", "ntk": "ntk", "yarn": "yarn", "llama3": "llama3"}
SCHEMA = {
    "model": schema.STR, "tokenizer": schema.STR, "dtype": schema.STR, "attention": schema.STR,
    "block_q": schema.POSITIVE_INT, "block_k": schema.POSITIVE_INT, "sliding_window": schema.Key(int, minimum=-1),
    "data": schema.SEQUENCE,
    "num_documents": schema.NON_NEGATIVE_INT, "sample_documents": schema.BOOL, "document_seed": schema.INT,
    "min_tokens": schema.Key(int, minimum=-1), "short_documents": schema.Key(str, choices=SHORT_DOCUMENT_POLICIES),
    "lengths": schema.SEQUENCE, "settings": schema.SEQUENCE, "original_length": schema.NON_NEGATIVE_INT,
    "protocol": schema.Key(str, choices=PROTOCOLS), "stride": schema.NON_NEGATIVE_INT,
    "batch_size": schema.POSITIVE_INT, "max_length": schema.POSITIVE_INT,
    "mesh": {"data": schema.INT, "fsdp": schema.INT, "sequence": schema.INT, "tensor": schema.INT},
    "save_windows": schema.BOOL, "progress": schema.BOOL,
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """A table row: `label`, and the RoPE scaling to use at each evaluation length."""
  label: str
  spec: str
  scaling_at: Callable[[int], rope_lib.RopeScaling]


_FILE_OPTIONS = {"target_length", "temperature_from"}


def _split_options(body: str) -> tuple[str, dict]:
  """PATH?key=value&key=value -> (PATH, options); a path that exists as given is never split."""
  if "?" not in body or epath.Path(body).exists():
    return body, {}
  path, query = body.split("?", 1)
  options = {}
  for item in filter(None, query.split("&")):
    key, sep, value = item.partition("=")
    if not sep or key not in _FILE_OPTIONS:
      raise EvalError(f"factor-file option {item!r}: expected key=value with key in {', '.join(sorted(_FILE_OPTIONS))}")
    options[key] = value
  return path, options


def _factor_file_setting(path: str, options: dict, config: model_lib.ModelConfig) -> rope_lib.RopeScaling:
  target = options.get("target_length")
  if target is not None and (not target.isdigit() or int(target) < 2):
    raise EvalError(f"factor file {path}: target_length must be a positive integer, got {target!r}")
  try:
    scaling = factors_lib.resolve_file(path, original_length=config.original_length,
                                       target_length=int(target) if target else None,
                                       n_layers=config.num_layers, rotary_dim=config.rotary_dim)
    if "temperature_from" in options:  # the paper's evaluation code: mscale from each evaluated length
      scaling = scaling.replace(temperature_from=options["temperature_from"], attention_factor=None)
  except (ValueError, OSError) as e:
    raise EvalError(f"setting {path}: {e}" + ("" if target else "; append ?target_length=N to the path")) from None
  return scaling


def parse_setting(spec: str, config: model_lib.ModelConfig) -> Setting:
  """A setting string (see configs/evaluate.py): none, model, pi/linear/ntk/yarn/llama3[:S], dynamic[:F],
  or a factor file PATH[?target_length=N&temperature_from=target|length]; any of them as LABEL=SPEC.

  Derived settings use the model's original window L (config.original_length): s = max(1, length / L).
  """
  spec = str(spec).strip()
  label, body = None, spec
  if "=" in spec and not epath.Path(spec).exists() and not epath.Path(spec.split("?", 1)[0]).exists():
    label, body = (part.strip() for part in spec.split("=", 1))
    if not label or not body:
      raise EvalError(f"setting {spec!r}: expected LABEL=SPEC")
  original = config.original_length
  name, _, arg = body.partition(":")
  fixed = None
  if arg and name in {**DERIVED_METHODS, "dynamic": 0}:
    try:
      fixed = float(arg)
    except ValueError:
      raise EvalError(f"setting {spec!r}: {arg!r} is not a number") from None
    if not math.isfinite(fixed) or fixed <= 0:
      raise EvalError(f"setting {spec!r}: the factor must be a positive number")
  path, options = _split_options(body)
  if body in ("none", "default"):
    scaling_at = lambda n: rope_lib.RopeScaling()
  elif body == "model":
    scaling_at = lambda n: config.rope_scaling
  elif name in DERIVED_METHODS and (not arg or fixed is not None):
    method = DERIVED_METHODS[name]

    def scaling_at(n, method=method):
      s = fixed if fixed is not None else max(1.0, n / original)
      return rope_lib.RopeScaling(method, factor=s, original_max_position_embeddings=original)
  elif name == "dynamic" and (not arg or fixed is not None):
    scaling = rope_lib.RopeScaling("dynamic", factor=fixed or 1.0, original_max_position_embeddings=original)
    scaling_at = lambda n: scaling
  elif epath.Path(path).is_file():  # any epath location (gs://, ...)
    scaling = _factor_file_setting(path, options, config)
    scaling_at = lambda n: scaling
    if label is None:
      file = epath.Path(path) if "://" in path else epath.Path(os.path.abspath(path))
      label = f"{file.parent.name}/{file.name}" if file.parent.name else file.name
  else:
    raise EvalError(f"setting {spec!r}: not a method (none, model, pi, linear, ntk, yarn, llama3, dynamic, "
                    "optionally METHOD:S) nor an existing factor file")
  config.rope_arrays(scaling_at(original))  # validate now (RopeError is a ValueError with a clear message)
  return Setting(label or body, spec, scaling_at)


def validate_config(config) -> None:
  """Unknown, missing or mistyped keys, then the checks across keys: one EvalError line each."""
  schema.check(config, SCHEMA, error=EvalError)
  lengths = tuple(config.lengths)
  if not lengths or any(not isinstance(n, int) or n < 2 for n in lengths):
    raise EvalError(f"lengths must be integers >= 2, got {lengths}")
  if max(lengths) > config.max_length:
    raise EvalError(f"length {max(lengths)} exceeds max_length {config.max_length}")
  if not tuple(config.settings):
    raise EvalError("settings is empty")
  if isinstance(config.data, str) or not tuple(config.data):
    raise EvalError("data must be a non-empty tuple of sources, e.g. ('builtin:test',)")
  if config.sample_documents and not config.num_documents:
    raise EvalError("sample_documents needs num_documents (how many to draw)")
  if not config.sample_documents and config.document_seed:
    raise EvalError("document_seed is set but sample_documents is False")
  if config.protocol == "sliding" and config.stride < 1:
    raise EvalError("protocol 'sliding' needs stride >= 1 (tokens between window starts)")
  if config.protocol == "truncate" and config.stride:
    raise EvalError(f"stride is set ({config.stride}) but protocol is 'truncate' (one window per document); "
                    "use protocol='sliding' or stride=0")


def load_model(config) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig with the config's execution settings and original window, params) of config.model."""
  try:
    model_config, params = weights.load_model_for(config)
  except ValueError as e:
    raise EvalError(str(e)) from None
  return model_config, params


def load_tokenizer_for(config):
  """config.tokenizer, with "auto" = the model's own (lrjax.weights.model_tokenizer)."""
  try:
    return weights.model_tokenizer(config.model, config.tokenizer)
  except weights.WeightsError as e:
    raise EvalError(str(e)) from None


def _documents(config, tokenizer, lengths: list[int]) -> tuple[dict, dict]:
  """{source: documents} and {source: indices of the qualifying documents used}."""
  min_tokens = max(lengths) if config.min_tokens == -1 else int(config.min_tokens)
  documents, chosen = {}, {}
  for src in (str(s) for s in config.data):
    docs = data_lib.tokenized_documents(
        src, tokenizer, min_tokens=min_tokens,
        max_documents=None if config.sample_documents else (config.num_documents or None))
    chosen[src] = (sample_documents(config.num_documents, len(docs), seed=config.document_seed)
                   if config.sample_documents and config.num_documents else list(range(len(docs))))
    documents[src] = [docs[i] for i in chosen[src]]
  return documents, chosen


def window_bos(tokenizer) -> int | None:
  """The BOS id every window starts with: the tokenizer's, when it prepends one to model input."""
  return tokenizer.bos_id if getattr(tokenizer, "add_bos", tokenizer.bos_id is not None) else None


def run(config, workdir: str, *, model: tuple[model_lib.ModelConfig, dict] | None = None,
        print_fn: Callable[[str], None] = print) -> dict:
  """Everything experiments/evaluate.py does: perplexity for every (source, setting, length).

  Writes into workdir: results.csv (one row per cell), results.json (config, cells, per-window NLL),
  table.txt and ppl.png (perplexity vs length, log y; one curve per setting [and source]).
  Args:
    config: a configs/evaluate.py ConfigDict.
    workdir: output directory.
    model: optional (ModelConfig, params) to use instead of loading config.model (tests, notebooks).
  Returns:
    {"table": {row: {length: ppl}}, "cells": [...], "files": {...}}.
  """
  validate_config(config)
  if not workdir:
    raise EvalError("--workdir is required")
  model_config, params = model if model is not None else load_model(config)
  if config.original_length:  # an explicit original window overrides the checkpoint's
    model_config = model_config.replace(original_max_position_embeddings=int(config.original_length))
  tokenizer = load_tokenizer_for(config)
  settings = [parse_setting(s, model_config) for s in config.settings]
  if len({s.label for s in settings}) < len(settings):
    raise EvalError(f"settings have duplicate labels: {[s.label for s in settings]}; use LABEL=SPEC")
  lengths = sorted(set(int(n) for n in config.lengths))
  documents, chosen = _documents(config, tokenizer, lengths)
  stride = config.stride if config.protocol == "sliding" else None
  kw = dict(protocol=config.protocol, stride=stride, bos_id=window_bos(tokenizer),
            short_documents=config.short_documents)
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding_lib.make_mesh(config.mesh)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # any epath location (gs://, ...)
  files = {k: os.fspath(epath.Path(workdir) / v) for k, v in
           (("csv", "results.csv"), ("json", "results.json"), ("table", "table.txt"), ("plot", "ppl.png"))}
  cells, table = [], {}
  total = sum(count_windows(docs, n, **kw) for docs in documents.values() for n in lengths) * len(settings)
  with report.progress_bar(config.progress, total=total, unit="window", desc="perplexity") as bar:
    for src, setting, n in ((s, st, n) for s in documents for st in settings for n in lengths):
      row = setting.label if len(documents) == 1 else f"{setting.label} @ {src}"
      scaling = setting.scaling_at(n)
      bar.set_postfix_str(f"{row} @ {n}")
      start = time.perf_counter()
      result = perplexity(model_config, params, documents[src], length=n, rope=scaling,
                          batch_size=config.batch_size, max_length=config.max_length, mesh=mesh,
                          progress=bar.update, **kw)
      cells.append({"source": src, "setting": setting.label, "spec": setting.spec, "row": row,
                    "scaling": _scaling_summary(scaling), "seconds": round(time.perf_counter() - start, 3),
                    **result.to_dict(windows=bool(config.save_windows))})
      table.setdefault(row, {})[n] = result.ppl
      if jax.process_index() == 0:  # every process computes every cell; one writes
        _write_outputs(files, config, model_config, cells, table, lengths, chosen)
  text = report.format_table(list(table), lengths, lambda r, n: table[r].get(n), row_header="setting \\ length")
  print_fn(f"{_title(config, model_config, stride)}; "
           f"{', '.join(f'{len(d)} docs from {s}' for s, d in documents.items())}:\n{text}")
  return {"table": table, "cells": cells, "files": files}


def _scaling_summary(scaling: rope_lib.RopeScaling) -> dict:
  out = {"method": scaling.method, "factor": scaling.factor}
  if scaling.original_max_position_embeddings:
    out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
  if scaling.method == "longrope":
    out["n_hat"] = scaling.n_hat
  return out


def _title(config, model_config: model_lib.ModelConfig, stride: int | None) -> str:
  return (f"perplexity ({config.protocol}{f', stride {stride}' if stride else ''}); original window "
          f"L = {model_config.original_length}")


def _write_outputs(files, config, model_config, cells, table, lengths, chosen) -> None:
  columns = ["source", "setting", "length", "ppl", "token_ppl", "mean_nll", "nll_sum", "count", "num_documents",
             "num_windows", "protocol", "stride", "seconds"]
  report.write_csv(files["csv"], columns, [[c[k] if c[k] is not None else "" for k in columns] for c in cells])
  report.write_json(files["json"], {
      "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
      "model": {"vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
                "num_layers": model_config.num_layers, "max_position_embeddings":
                model_config.max_position_embeddings, "original_length": model_config.original_length,
                "rope_theta": model_config.rope_theta},
      "documents": chosen, "cells": cells})
  stride = config.stride if config.protocol == "sliding" else None
  report.write_text(files["table"], _title(config, model_config, stride) + "\n" + report.format_table(
      list(table), lengths, lambda r, n: table[r].get(n), row_header="setting \\ length") + "\n")
  report.perplexity_plot(files["plot"], table, title=f"perplexity vs length ({config.protocol}, L = "
                         f"{model_config.original_length})")
