"""lrjax's native checkpoints: params as an orbax checkpoint (directory/params) plus lrjax_config.json."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lrjax import factors
from lrjax import model as model_lib
from lrjax.weights import arch
from lrjax.weights.common import WeightsError, dtype_name, np_dtype, read_json, staged_directory, write_json

NATIVE_FORMAT = "lrjax-native"
NATIVE_VERSION = 1


def config_to_dict(config: model_lib.ModelConfig) -> dict:
  """ModelConfig (and its RopeScaling) as plain JSON values."""
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  out["rope_scaling"] = factors.scaling_to_dict(config.rope_scaling)
  if isinstance(out["eos_token_id"], tuple):
    out["eos_token_id"] = list(out["eos_token_id"])
  return out


def config_from_dict(data: dict, *, source: str = "config") -> model_lib.ModelConfig:
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise WeightsError(f"{source}: unknown config keys {', '.join(unknown)}")
  kw = dict(data)
  try:
    if "rope_scaling" in kw:
      kw["rope_scaling"] = factors.scaling_from_dict(kw["rope_scaling"], source=source)
    for key in ("bos_token_id", "eos_token_id"):
      if isinstance(kw.get(key), list):
        kw[key] = tuple(kw[key])
    return model_lib.ModelConfig(**kw)
  except (TypeError, ValueError) as e:
    raise WeightsError(f"{source}: invalid config ({e})") from None


def save_native(directory: str | os.PathLike, config: model_lib.ModelConfig, params: dict, *,
                overwrite: bool = False) -> None:
  """Writes params as an orbax checkpoint (directory/params) plus directory/lrjax_config.json.

  Call from a single process (use lrjax's training checkpoints for multi-host state).
  """
  arch.check_params(config, params)
  with staged_directory(directory, overwrite) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), params)
    checkpointer.wait_until_finished()
    write_json(os.path.join(tmp, "lrjax_config.json"),
                {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "config": config_to_dict(config)})


def load_native(directory: str | os.PathLike, *, dtype: str | None = None
                ) -> tuple[model_lib.ModelConfig, dict]:
  """Reads a save_native directory; params come back as host numpy arrays."""
  directory = os.path.abspath(os.fspath(directory))
  path = os.path.join(directory, "lrjax_config.json")
  doc = read_json(path, "lrjax_config.json")
  if doc.get("format") != NATIVE_FORMAT or doc.get("version") != NATIVE_VERSION:
    raise WeightsError(f"{path}: not an lrjax native checkpoint of version {NATIVE_VERSION} "
                       f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
  cfg = config_from_dict(doc.get("config") or {}, source=path)
  params_dir = os.path.join(directory, "params")
  try:
    tree = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    params = ocp.PyTreeCheckpointer().restore(params_dir, restore_args=restore_args)
  except Exception as e:
    raise WeightsError(f"{params_dir}: cannot restore orbax checkpoint ({str(e).splitlines()[0]})") from None
  params = jax.tree.map(np.asarray, dict(params))
  arch.check_params(cfg, params)
  target = np_dtype(dtype)
  if target is not None:
    params = jax.tree.map(lambda a: a.astype(target), params)
    cfg = cfg.replace(param_dtype=dtype_name(target))
  return cfg, params


# ----------------------------------------------------------------------------------------------------------
