"""What every checkpoint format shares: the error type, dtypes, the params layout helpers, atomic directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = ("float32", "bfloat16", "float16")


class WeightsError(ValueError):
  """A checkpoint or config that cannot be read or written; the message names the file and the problem."""


def np_dtype(name: str | None):
  """numpy dtype of "float32" | "bfloat16" | "float16" (None stays None)."""
  if name is None:
    return None
  if str(name) not in DTYPES:
    raise WeightsError(f"unsupported dtype {name!r}; expected one of {', '.join(DTYPES)}")
  return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(str(name))


def dtype_name(dtype) -> str:
  return "bfloat16" if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).name


def flatten(params: dict) -> dict:
  """{"layers": {"q": ...}, "embed": ...} -> {"layers/q": ..., "embed": ...}."""
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      out.update({f"{k}/{kk}": vv for kk, vv in v.items()})
    else:
      out[k] = v
  return out


def nest(flat: dict) -> dict:
  out: dict = {}
  for k, v in flat.items():
    head, _, tail = k.partition("/")
    if tail:
      out.setdefault(head, {})[tail] = v
    else:
      out[k] = v
  return out


def read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise WeightsError(f"{path}: missing {what}") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f"{path}: malformed {what} ({e})") from None
  if not isinstance(data, dict):
    raise WeightsError(f"{path}: malformed {what} (expected a JSON object)")
  return data


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, allow_nan=False)
    f.write("\n")


def check_dest(dest: str | os.PathLike, overwrite: bool) -> str:
  dest = os.path.abspath(os.fspath(dest))
  if os.path.exists(dest):
    if not os.path.isdir(dest):
      raise WeightsError(f"{dest} exists and is not a directory")
    if os.listdir(dest) and not overwrite:
      raise WeightsError(f"{dest} exists and is not empty (pass overwrite=True to replace it)")
  return dest


@contextlib.contextmanager
def staged_directory(dest: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """Yields a fresh temp directory next to `dest`; on success it replaces `dest`, on failure it is removed,
  and an existing `dest` is restored if the final rename fails."""
  dest = check_dest(dest, overwrite)
  parent, name = os.path.split(dest)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    yield tmp
    if os.path.isdir(dest) and not os.listdir(dest):
      os.rmdir(dest)
    if os.path.exists(dest):
      backup = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
      os.rename(dest, backup)
      try:
        os.rename(tmp, dest)
      except BaseException:
        os.rename(backup, dest)  # put the old checkpoint back
        raise
      shutil.rmtree(backup, ignore_errors=True)
    else:
      os.rename(tmp, dest)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def copy_extra(tmp: str, extra_files: Mapping[str, str] | None) -> None:
  for name, src in (extra_files or {}).items():
    if os.path.basename(name) != name or name.startswith("."):
      raise WeightsError(f"extra file name {name!r} must be a plain file name")
    try:
      shutil.copyfile(src, os.path.join(tmp, name))
    except OSError as e:
      raise WeightsError(f"{src}: cannot copy ({e.strerror or e})") from None
