"""Factor files and the mapping between `rope.RopeScaling` and Hugging Face config fields.

Two file formats:

* lrjax JSON (`save` / `load` / `read`): every `RopeScaling` field (method, factor s, original length L, YaRN and
  Llama 3 settings, long/short factors, buckets, n̂, temperature, attention factor), the target length, and a
  free-form provenance record (search settings, seed, fitness, date)::

    {"format": "lrjax-rope-scaling", "version": 1, "target_length": 131072,
     "scaling": {"method": "longrope", "long_factor": [...], "n_hat": 0, ...},
     "provenance": {"saved_at": "2026-...", "seed": 0, ...}}

* the official LongRoPE CSV (`save_csv`; read by `load` too): one λ per line (the search's result_final.csv), or
  one comma-separated row per decoder layer (the paper's per-layer tables). np.loadtxt(delimiter=",") reads both.

Factor files are validated when read: count == rotary_dim/2 (when the caller knows it), rows == layers for
per-layer tables, every value finite and > 0. Monotonicity is not required: the published Mistral tables are
not monotone. Paths are any etils.epath location (local, gs://, ...).

`rope_scaling_from_hf` parses the transformers-4 form (top-level rope_theta + rope_scaling) and the
transformers-5 form (rope_parameters, possibly nested per layer type); `rope_scaling_to_hf` writes both at once,
so either major version loads the same frequencies.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import warnings
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from lrjax import report
from lrjax import rope

FORMAT = "lrjax-rope-scaling"
VERSION = 1

# transformers rope types this module understands; "su" and the Phi-3 "yarn"-with-factor-lists are longrope.
HF_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "su")
# Keys of a transformers rope dict that carry no scaling information, or that we read elsewhere.
_HF_GENERIC_KEYS = {"type", "rope_type", "rope_theta", "partial_rotary_factor"}
_HF_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "longrope": {"factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                 "long_factor"},
}
# Keys that change the numbers in some loader but that RopeScaling cannot represent: refuse rather than drop.
_HF_UNSUPPORTED_KEYS = {"short_mscale", "long_mscale"}


class FactorFileError(rope.RopeError):
  """A factor file that cannot be read or used; the message names the file and the problem."""


class FactorFile(NamedTuple):
  """Everything a factor file holds.

  scaling: the RoPE setting. target_length: the context length it was made for (tokens), or None.
  provenance: free-form JSON record of how it was made.
  """

  scaling: rope.RopeScaling
  target_length: int | None
  provenance: dict


# ----------------------------------------------------------------------------------------------------------
# Files.


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (datetime.date, datetime.datetime)):
    return value.isoformat()
  raise TypeError(f"provenance value of type {type(value).__name__} is not JSON-serialisable")


def scaling_to_dict(scaling: rope.RopeScaling) -> dict:
  """Every field of a RopeScaling as plain JSON values (factor tuples become lists)."""
  out = {}
  for field in dataclasses.fields(scaling):
    value = getattr(scaling, field.name)
    if field.name == "buckets":
      value = [[n, list(map(list, f)) if isinstance(f[0], tuple) else list(f)] for n, f in value]
    elif isinstance(value, tuple):
      value = [list(row) if isinstance(row, tuple) else row for row in value]
    out[field.name] = value
  return out


def scaling_from_dict(data: dict, *, source: str = "scaling") -> rope.RopeScaling:
  """Inverse of scaling_to_dict; unknown keys are an error (a field nothing reads is a silent bug)."""
  if not isinstance(data, dict):
    raise FactorFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
  known = {f.name for f in dataclasses.fields(rope.RopeScaling)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise FactorFileError(f"{source}: unknown scaling keys {', '.join(unknown)}")
  if "method" not in data:
    raise FactorFileError(f"{source}: missing 'method'")
  kw = dict(data)
  if "buckets" in kw:
    try:
      kw["buckets"] = tuple((int(n), f) for n, f in kw["buckets"])
    except (TypeError, ValueError):
      raise FactorFileError(f"{source}: buckets must be a list of [max_len, factors] pairs") from None
  try:
    return rope.RopeScaling(**kw)
  except (TypeError, ValueError) as e:
    raise FactorFileError(f"{source}: {e}") from None


def validate(scaling: rope.RopeScaling, *, n_layers: int | None = None, rotary_dim: int | None = None,
             source: str = "factors") -> None:
  """Checks factor counts and per-layer rows against a model; raises FactorFileError naming `source`."""
  if scaling.method != "longrope":
    return
  for name, factors in scaling.factor_sets():
    arr = np.asarray(factors, np.float64)
    if rotary_dim is not None and arr.shape[-1] != rotary_dim // 2:
      raise FactorFileError(f"{source}: {name} has {arr.shape[-1]} factors but rotary_dim/2 = {rotary_dim // 2}")
    if arr.ndim == 2 and n_layers is not None and arr.shape[0] != n_layers:
      raise FactorFileError(f"{source}: {name} has {arr.shape[0]} per-layer rows but the model has {n_layers} "
                            "layers")


def save(path: str | os.PathLike, scaling: rope.RopeScaling, provenance: dict | None = None, *,
         target_length: int | None = None) -> None:
  """Writes `scaling` as lrjax JSON, atomically. provenance gets a "saved_at" UTC timestamp if it has none."""
  provenance = dict(provenance or {})
  provenance.setdefault("saved_at", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  doc = {"format": FORMAT, "version": VERSION,
         "target_length": None if target_length is None else int(target_length),
         "scaling": scaling_to_dict(scaling), "provenance": provenance}
  try:
    text = json.dumps(doc, indent=1, allow_nan=False, default=_json_default)
  except ValueError as e:  # NaN/inf in provenance
    raise FactorFileError(f"{os.fspath(path)}: cannot write non-finite number ({e})") from None
  report.atomic_write(path, text + "\n")


def save_csv(path: str | os.PathLike, factors) -> None:
  """Writes factors in the official LongRoPE CSV layout: [d/2] one per line, [layers, d/2] one row per layer."""
  arr = np.asarray(factors, np.float64)
  if arr.ndim not in (1, 2):
    raise FactorFileError(f"{os.fspath(path)}: factors must be [d/2] or [layers, d/2], got shape {arr.shape}")
  if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise FactorFileError(f"{os.fspath(path)}: factors must be finite and > 0")
  rows = arr[:, None] if arr.ndim == 1 else arr
  report.atomic_write(path, "".join(",".join(repr(float(x)) for x in row) + "\n" for row in rows))


def _read_csv(path: str, text: str) -> np.ndarray:
  rows = []
  for lineno, line in enumerate(text.splitlines(), 1):
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    try:
      rows.append([float(x) for x in line.split(",")])
    except ValueError:
      raise FactorFileError(f"{path}: line {lineno} is not comma-separated numbers: {line[:60]!r}") from None
  if not rows:
    raise FactorFileError(f"{path}: no factors found")
  if all(len(r) == 1 for r in rows):  # one value per line
    return np.asarray([r[0] for r in rows], np.float64)
  if len({len(r) for r in rows}) != 1:
    raise FactorFileError(f"{path}: rows have different lengths {sorted({len(r) for r in rows})}")
  arr = np.asarray(rows, np.float64)
  return arr[0] if len(rows) == 1 else arr


def read(path: str | os.PathLike, *, n_layers: int | None = None, rotary_dim: int | None = None) -> FactorFile:
  """Reads an lrjax JSON or official CSV factor file (told apart by content) and validates it.

  A CSV gives RopeScaling(method="longrope", long_factor=..., factor=None) with no original length and no
  target: `resolve_file` (or rope.resolve) must make them explicit before use, since the attention temperature
  depends on them.
  """
  path = os.fspath(path)
  try:
    text = epath.Path(path).read_text()  # any epath location (gs://, ...)
  except OSError as e:
    raise FactorFileError(f"{path}: cannot read factor file ({e.strerror or e})") from None
  if text.lstrip().startswith("{"):
    try:
      doc = json.loads(text)
    except json.JSONDecodeError as e:
      raise FactorFileError(f"{path}: malformed JSON ({e})") from None
    if doc.get("format") != FORMAT:
      raise FactorFileError(f"{path}: not an lrjax factor file (format={doc.get('format')!r}, expected "
                            f"{FORMAT!r})")
    if doc.get("version") != VERSION:
      raise FactorFileError(f"{path}: unsupported factor file version {doc.get('version')!r}")
    unknown = sorted(set(doc) - {"format", "version", "target_length", "scaling", "provenance"})
    if unknown:
      raise FactorFileError(f"{path}: unknown keys {', '.join(unknown)}")
    if not isinstance(doc.get("scaling"), dict):
      raise FactorFileError(f"{path}: 'scaling' must be a JSON object")
    _check_values(path, doc["scaling"])
    scaling = scaling_from_dict(doc["scaling"], source=path)
    target = doc.get("target_length")
    if target is not None and (not isinstance(target, int) or target <= 0):
      raise FactorFileError(f"{path}: target_length must be a positive integer, got {target!r}")
    provenance = doc.get("provenance") or {}
  else:
    arr = _read_csv(path, text)
    _check_values(path, {"long_factor": arr})
    scaling = rope.RopeScaling(method="longrope", factor=None, long_factor=arr)
    target, provenance = None, {"source": epath.Path(path).name}
  validate(scaling, n_layers=n_layers, rotary_dim=rotary_dim, source=path)
  return FactorFile(scaling, target, provenance)


def _check_values(path: str, scaling: dict) -> None:
  """Finite and > 0, reported with the file name (RopeScaling would say the same without it)."""
  sets = [(k, scaling.get(k)) for k in ("long_factor", "short_factor")]
  sets += [(f"buckets[{i}]", b[1] if isinstance(b, (list, tuple)) and len(b) == 2 else None)
           for i, b in enumerate(scaling.get("buckets") or [])]
  for name, value in sets:
    if value is None:
      continue
    try:
      arr = np.asarray(value, np.float64)
    except (TypeError, ValueError):
      raise FactorFileError(f"{path}: {name} is not a list of numbers (or of equal-length rows)") from None
    if arr.ndim not in (1, 2) or arr.size == 0:
      raise FactorFileError(f"{path}: {name} must have shape [d/2] or [layers, d/2], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
      raise FactorFileError(f"{path}: {name} contains NaN or inf")
    if np.any(arr <= 0):
      raise FactorFileError(f"{path}: {name} must be > 0, found {arr.min():g}")


def load(path: str | os.PathLike, *, n_layers: int | None = None, rotary_dim: int | None = None
         ) -> rope.RopeScaling:
  """The RopeScaling of a factor file (see `read`)."""
  return read(path, n_layers=n_layers, rotary_dim=rotary_dim).scaling


def resolve_file(path: str | os.PathLike, *, original_length: int, target_length: int | None = None,
                 n_layers: int | None = None, rotary_dim: int | None = None) -> rope.RopeScaling:
  """A factor file's setting made explicit against a model (rope.resolve): the file's own original window and
  target length win; else L = original_length and s = target_length / L. Without any target, a bare table (the
  official CSV) is an error naming the missing target length."""
  ff = read(path, n_layers=n_layers, rotary_dim=rotary_dim)
  try:
    return rope.resolve(ff.scaling, original_length=original_length, target_length=ff.target_length or target_length)
  except rope.RopeError as e:
    raise FactorFileError(f"{os.fspath(path)}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Hugging Face config fields.


def hf_rope_dict(config: dict) -> dict:
  """The flat rope dict of an HF config.json, resolved as transformers 5 does.

  rope_scaling (v4) takes priority over rope_parameters (v5), as in transformers 5's loader; a rope_parameters
  nested per layer type yields its "full_attention" entry (with a warning, since other layer types are dropped).
  The result always has "rope_type" and "rope_theta".
  """
  if not isinstance(config, dict):
    raise rope.RopeError(f"config must be a JSON object, got {type(config).__name__}")
  raw = config.get("rope_scaling") or config.get("rope_parameters") or {}
  if not isinstance(raw, dict):
    raise rope.RopeError(f"rope_scaling/rope_parameters must be an object, got {type(raw).__name__}")
  if raw and "rope_type" not in raw and "type" not in raw and all(isinstance(v, dict) for v in raw.values()):
    if "full_attention" not in raw:
      raise rope.RopeError(f"rope_parameters is nested per layer type ({', '.join(raw)}) with no "
                           "'full_attention' entry")
    if len(raw) > 1:
      warnings.warn(f"rope_parameters is nested per layer type ({', '.join(raw)}); using 'full_attention'",
                    stacklevel=2)
    raw = raw["full_attention"]
  out = dict(raw)
  out["rope_type"] = raw.get("rope_type", raw.get("type", "default"))
  out.pop("type", None)
  out.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
  return out


def rope_scaling_from_hf(config: dict) -> tuple[float, rope.RopeScaling]:
  """(rope_theta, RopeScaling) of an HF config.json dict, v4 or v5 form, with transformers 5 semantics.

  "su", and Phi-3 "yarn" with short/long factor lists, are longrope. original_max_position_embeddings comes from
  the top level first (Phi-3 keeps it there), then the rope dict, then max_position_embeddings.
  """
  params = hf_rope_dict(config)
  theta = params["rope_theta"]
  if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
    raise rope.RopeError(f"rope_theta must be a positive number, got {theta!r}")
  kind = params["rope_type"]
  if kind == "su" or (kind == "yarn" and ("long_factor" in params or "short_factor" in params)):
    kind = "longrope"
  if kind not in _HF_KEYS:
    raise rope.RopeError(f"unsupported rope type {params['rope_type']!r} (supported: {', '.join(HF_TYPES)})")
  bad = sorted(_HF_UNSUPPORTED_KEYS & set(params))
  if bad:
    raise rope.RopeError(f"rope keys {', '.join(bad)} (per-regime attention factors) are not supported")
  ignored = sorted(set(params) - _HF_GENERIC_KEYS - _HF_KEYS[kind])
  if ignored:
    # transformers ignores these too (with a warning); follow it so the numbers match.
    warnings.warn(f"ignoring {kind} rope keys {', '.join(ignored)} (transformers ignores them too)", stacklevel=2)
  max_pos = config.get("max_position_embeddings", 2048)
  original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
      or max_pos
  get = params.get
  if kind == "default":
    return float(theta), rope.RopeScaling()
  if kind in ("linear", "dynamic"):
    if get("factor") is None:
      raise rope.RopeError(f"{kind} rope scaling needs 'factor'")
    return float(theta), rope.RopeScaling(method=kind, factor=float(get("factor")))
  if kind == "yarn":
    factor = get("factor")
    return float(theta), rope.RopeScaling(
        method="yarn", factor=float(factor) if factor is not None else max_pos / original,
        original_max_position_embeddings=int(original), beta_fast=float(get("beta_fast") or 32),
        beta_slow=float(get("beta_slow") or 1), truncate=bool(get("truncate", True)),
        attention_factor=None if get("attention_factor") is None else float(get("attention_factor")),
        mscale=get("mscale"), mscale_all_dim=get("mscale_all_dim"))
  if kind == "llama3":
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if get(k) is None]
    if missing:
      raise rope.RopeError(f"llama3 rope scaling needs {', '.join(missing)}")
    return float(theta), rope.RopeScaling(
        method="llama3", factor=float(get("factor")), original_max_position_embeddings=int(original),
        low_freq_factor=float(get("low_freq_factor")), high_freq_factor=float(get("high_freq_factor")))
  if get("long_factor") is None or get("short_factor") is None:
    raise rope.RopeError("longrope rope scaling needs both short_factor and long_factor")
  # transformers: s = factor, else max_position_embeddings / original; made explicit here so that no later
  # path can reinterpret it.
  factor = float(get("factor")) if get("factor") is not None else max_pos / int(original)
  return float(theta), rope.RopeScaling(
      method="longrope", factor=factor,
      original_max_position_embeddings=int(original), long_factor=get("long_factor"),
      short_factor=get("short_factor"),
      attention_factor=None if get("attention_factor") is None else float(get("attention_factor")))


def rope_scaling_to_hf(scaling: rope.RopeScaling, *, rope_theta: float, max_position_embeddings: int,
                       rotary_dim: int, allow_dropping_n_hat: bool = False) -> dict[str, Any]:
  """Config fields to merge into config.json, in the transformers 4 and 5 forms at once.

  Returns {"rope_theta", "rope_scaling" (with both "type" and "rope_type", or None), "rope_parameters" (the same
  content plus rope_theta)}, and for longrope also a top-level "original_max_position_embeddings" (transformers 4
  reads it only there). Both major versions then load the same frequencies.

  Method notes:
  * ntk has no HF type: it becomes rope_type "default" with rope_theta' = b·s^(d/(d-2)) (the same base lrjax
    uses, so the frequencies are identical).
  * longrope writes factor and attention_factor explicitly, so loaders that derive them differently (4.x
    overrides factor with max/original) agree. A setting without short factors uses its long factors at every
    length in lrjax; the export writes short_factor = long_factor so transformers does the same.
  * n̂ > 0, per-layer factor tables and buckets have no HF form: error (n̂ may be dropped explicitly with
    allow_dropping_n_hat=True, which changes the first n̂ positions' angles).
  """
  m = scaling.method
  theta = float(rope_theta)
  body: dict[str, Any]
  if m == "default":
    body = {}
  elif m == "ntk":
    theta = theta * scaling.factor ** (rotary_dim / (rotary_dim - 2))
    body = {}
  elif m in ("linear", "dynamic"):
    body = {"factor": float(scaling.factor)}
  elif m == "yarn":
    body = {"factor": float(scaling.factor),
            "original_max_position_embeddings": int(scaling.original_max_position_embeddings),
            "beta_fast": float(scaling.beta_fast), "beta_slow": float(scaling.beta_slow),
            "truncate": bool(scaling.truncate)}
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(scaling, key) is not None:
        body[key] = float(getattr(scaling, key))
  elif m == "llama3":
    body = {"factor": float(scaling.factor),
            "original_max_position_embeddings": int(scaling.original_max_position_embeddings),
            "low_freq_factor": float(scaling.low_freq_factor),
            "high_freq_factor": float(scaling.high_freq_factor)}
  else:
    body = _longrope_to_hf(scaling, max_position_embeddings, rotary_dim, allow_dropping_n_hat)
  kind = "default" if m == "ntk" else m
  out: dict[str, Any] = {"rope_theta": theta,
                         "rope_scaling": None if kind == "default" else {"type": kind, "rope_type": kind, **body},
                         "rope_parameters": {"rope_type": kind, "rope_theta": theta, **body}}
  if m == "longrope":
    out["original_max_position_embeddings"] = body["original_max_position_embeddings"]
  return out


def _longrope_to_hf(scaling: rope.RopeScaling, max_position_embeddings: int, rotary_dim: int,
                    allow_dropping_n_hat: bool) -> dict:
  if scaling.n_hat > 0 and not allow_dropping_n_hat:
    raise rope.RopeError(f"n_hat={scaling.n_hat} cannot be expressed in an HF config (pass "
                         "allow_dropping_n_hat=True to export without it)")
  if scaling.buckets:
    raise rope.RopeError("bucketed longrope factors cannot be expressed in an HF config (it has one short/long "
                         "switch only)")
  validate(scaling, rotary_dim=rotary_dim, source="longrope scaling")
  for name, factors in scaling.factor_sets():
    if np.asarray(factors).ndim != 1:
      raise rope.RopeError(f"per-layer {name} tables cannot be expressed in an HF config")
  if scaling.temperature_from != "target":
    raise rope.RopeError("temperature_from='length' has no HF form (transformers fixes the attention factor from "
                         "the target); export with temperature_from='target'")
  original = int(scaling.original_max_position_embeddings)
  short = scaling.short_factor if scaling.short_factor is not None else scaling.long_factor
  return {"factor": float(rope.longrope_scale(scaling)),
          "original_max_position_embeddings": original,
          "attention_factor": float(rope.longrope_attention_factor(scaling)),
          "short_factor": [float(x) for x in short], "long_factor": [float(x) for x in scaling.long_factor]}
