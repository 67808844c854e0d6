"""Checkpoint conversion: any format lrjax reads -> hf | meta | native, optionally with a RoPE setting written
into the exported config (experiments/convert.py)."""

from __future__ import annotations

import os

from lrjax import factors, schema
from lrjax import rope as rope_lib
from lrjax.weights import arch, hf, meta, native, registry
from lrjax.weights.common import WeightsError, check_dest, np_dtype

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "generation_config.json")
FORMATS = ("hf", "meta", "native")


def convert(source: str | os.PathLike, dest: str | os.PathLike, *, format: str = "hf", dtype: str | None = None,
            max_shard_bytes: int | None = None, scaling: rope_lib.RopeScaling | None = None,
            target_length: int | None = None, overwrite: bool = False,
            allow_dropping_n_hat: bool = False) -> str:
  """Converts a checkpoint directory (any format `load` reads) into `format`; returns a one-line summary.

  Args:
    dtype: storage dtype of the output (None: the source's).
    max_shard_bytes: hf only; shard the safetensors above this size.
    scaling: a RoPE setting to write into the exported config (e.g. from a factor file), resolved by
      rope.resolve against the source's original window (ModelConfig.original_length).
    target_length: the exported max_position_embeddings (with `scaling` only; default: keep the source's).
      A longrope setting without an explicit factor takes s = target_length / original from it; one with
      neither is an error.
  Tokenizer files next to an HF or Meta source are copied along (hf: all of them; meta: tokenizer.model).
  """
  if format not in FORMATS:
    raise WeightsError(f"unknown destination format {format!r}; expected one of {', '.join(FORMATS)}")
  if max_shard_bytes is not None and format != "hf":
    raise WeightsError("max_shard_bytes applies to format=hf only")
  if allow_dropping_n_hat and format != "hf":
    raise WeightsError("allow_dropping_n_hat applies to format=hf only")
  if target_length is not None and scaling is None:
    raise WeightsError("target_length applies only together with a scaling (factor file)")
  source, dest = os.fspath(source), os.fspath(dest)
  if os.path.abspath(source) == os.path.abspath(dest):
    raise WeightsError(f"{dest}: destination is the source")
  src_format = registry.checkpoint_format(source)
  check_dest(dest, overwrite)  # before the (long) load
  cfg, params = registry.load(source, dtype=dtype)
  if scaling is not None:
    if scaling.method == "dynamic" and target_length not in (None, cfg.max_position_embeddings):
      raise WeightsError("dynamic NTK reads max_position_embeddings as the original length; a target_length "
                         "would change its frequencies (leave it unset)")
    try:  # the one rule: the setting's own values, else L = the source's window and s = target / L
      scaling = rope_lib.resolve(scaling, original_length=cfg.original_length, target_length=target_length)
    except rope_lib.RopeError as e:
      raise WeightsError(f"factors: {e}") from None
    arch.validate_scaling(scaling, cfg, "factors")
    cfg = cfg.replace(rope_scaling=scaling, max_position_embeddings=int(target_length or
                                                                        cfg.max_position_embeddings),
                      original_max_position_embeddings=cfg.original_length)
  out_dtype = dtype or cfg.param_dtype
  copy = {"hf": _TOKENIZER_FILES, "meta": ("tokenizer.model",), "native": ()}[format]
  extra = {n: os.path.join(source, n) for n in copy if os.path.isfile(os.path.join(source, n))}
  if format == "hf":
    weights_files = len(hf.plan_shards(cfg, np_dtype(out_dtype), max_shard_bytes, arch.export_architecture(cfg)))
    hf.save_hf(dest, cfg, params, dtype=out_dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
            allow_dropping_n_hat=allow_dropping_n_hat, extra_files=extra)
  elif format == "meta":
    weights_files = 1
    meta.save_meta(dest, cfg, params, dtype=out_dtype, overwrite=overwrite, extra_files=extra)
  else:
    weights_files = 1
    native.save_native(dest, cfg, params, overwrite=overwrite)
  s = cfg.rope_scaling
  rope_desc = s.method + (f" s={s.factor:g}" if s.method != "default" else "")
  return (f"{source} ({src_format}) -> {dest} ({format}, {out_dtype}, {weights_files} weight file(s)): "
          f"{cfg.num_layers} layers, {cfg.num_params() / 1e6:.2f}M params, max_position_embeddings "
          f"{cfg.max_position_embeddings}, rope {rope_desc}"
          + (f", {len(extra)} tokenizer file(s) copied" if extra else ""))


def run(config) -> str:
  """experiments/convert.py: validates a configs/convert.py ConfigDict (no value that nothing reads) and
  converts; returns the one-line summary."""
  schema.check(config, _schema(), error=WeightsError)
  c = config
  if not c.source or not c.dest:
    raise WeightsError("set --config.source and --config.dest")
  if c.format not in FORMATS:
    raise WeightsError(f"unknown format {c.format!r}; expected one of {', '.join(FORMATS)}")
  if c.max_shard_size and c.format != "hf":
    raise WeightsError("max_shard_size applies to format=hf only")
  if c.allow_dropping_n_hat and c.format != "hf":
    raise WeightsError("allow_dropping_n_hat applies to format=hf only")
  if (c.target_length or c.original_length) and not c.factors:
    raise WeightsError("target_length and original_length apply only together with factors")
  scaling, target = None, None
  if c.factors:
    loaded = factors.read(c.factors)
    scaling, target = loaded.scaling, c.target_length or loaded.target_length
    if c.original_length:
      scaling = scaling.replace(original_max_position_embeddings=c.original_length)
  return convert(c.source, c.dest, format=c.format, dtype=c.dtype or None,
                 max_shard_bytes=hf.parse_size(c.max_shard_size) if c.max_shard_size else None,
                 scaling=scaling, target_length=target, overwrite=c.overwrite,
                 allow_dropping_n_hat=c.allow_dropping_n_hat)


def _schema() -> dict:
  return {"source": schema.STR, "dest": schema.STR, "format": schema.STR, "dtype": schema.STR,
          "max_shard_size": schema.STR, "factors": schema.STR, "target_length": schema.NON_NEGATIVE_INT,
          "original_length": schema.NON_NEGATIVE_INT, "allow_dropping_n_hat": schema.BOOL, "overwrite": schema.BOOL}
