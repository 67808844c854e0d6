"""The training config (configs/pretrain.py, configs/finetune.py): schema, model, stages and their RoPE."""

from __future__ import annotations

import dataclasses
import os

from lrjax import model as model_lib
from lrjax import rope as rope_lib
from lrjax import schema
from lrjax import factors, weights

SCHEDULES = ("constant", "linear", "cosine")
NAN_POLICIES = ("skip", "stop")


class TrainError(ValueError):
  """A training setting or input that cannot work; the message names the problem."""


class NonFiniteError(TrainError):
  """The loss or gradients became NaN/inf and the config says stop."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage. rope_name is what the config said (method name or factor file path)."""

  index: int
  length: int
  steps: int
  rope: rope_lib.RopeScaling
  rope_name: str
  lr: float
  schedule: str
  warmup_steps: int
  end_lr_ratio: float


_MODEL_FIELDS = {f.name for f in dataclasses.fields(model_lib.ModelConfig)} - {"rope_scaling"}
_COMPONENT = {"path": schema.STR, "weight": schema.FLOAT, "min_tokens": schema.NON_NEGATIVE_INT,
              "max_tokens": schema.NON_NEGATIVE_INT}
_STAGE = {"length": schema.POSITIVE_INT, "steps": schema.POSITIVE_INT, "rope": schema.STR, "lr": schema.FLOAT,
          "rope_factor": schema.Key(float, optional=True),
          "schedule": schema.Key(str, choices=SCHEDULES, optional=True),
          "warmup_steps": schema.Key(int, minimum=0, optional=True),
          "end_lr_ratio": schema.Key(float, optional=True)}
SCHEMA = {
    "seed": schema.INT, "model": schema.Key(object), "init": schema.STR,
    "data": {"source": schema.STR, "tokenizer": schema.STR, "separator": schema.Key((tuple, type(None))),
             "mixture": schema.Each(_COMPONENT), "document_mask": schema.BOOL, "reset_positions": schema.BOOL,
             "mixed_original_length": schema.NON_NEGATIVE_INT, "num_workers": schema.NON_NEGATIVE_INT},
    "batch_size": schema.POSITIVE_INT, "accumulation": schema.POSITIVE_INT,
    "optimizer": {"b1": schema.FLOAT, "b2": schema.FLOAT, "eps": schema.FLOAT, "weight_decay": schema.FLOAT,
                  "grad_clip": schema.FLOAT},
    "stages": schema.Each(_STAGE, minimum=1), "loss_chunk": schema.POSITIVE_INT,
    "nan_policy": schema.Key(str, choices=NAN_POLICIES),
    "mesh": {"data": schema.INT, "fsdp": schema.INT, "sequence": schema.INT, "tensor": schema.INT},
    "log_every": schema.POSITIVE_INT, "checkpoint_every": schema.POSITIVE_INT,
    "keep_checkpoints": schema.POSITIVE_INT, "async_checkpoints": schema.BOOL, "peak_flops": schema.FLOAT,
    "export_hf": schema.Key(str, optional=True), "dry_run": schema.Key(bool, optional=True),
    "device_memory_gb": schema.Key(float, optional=True),
}


def validate_config(config) -> None:
  """The schema (unknown keys anywhere are errors: a value nothing reads is a silent bug), then cross-key
  checks; one TrainError line each."""
  schema.check(config, SCHEMA, error=TrainError)
  if config.get("dry_run"):
    raise TrainError("config.dry_run is set: experiments/train.py runs lrjax.dryrun instead of training")
  if config.batch_size % config.accumulation:
    raise TrainError(f"batch_size {config.batch_size} is not divisible by accumulation {config.accumulation}")
  d = config.data
  if bool(d.source) == bool(d.mixture):
    raise TrainError("set exactly one of data.source (one source) and data.mixture (weighted sources)")
  if d.mixed_original_length and not d.reset_positions:
    raise TrainError("data.mixed_original_length (LongRoPE2 mixed context window) needs data.reset_positions "
                     "(short documents use the original RoPE from position 0)")


def model_config(config) -> model_lib.ModelConfig:
  """The ModelConfig of `config.model` (every key must be a ModelConfig field). Its original window is
  config.model's when given, else the one `config.init` declares (e.g. Mistral's 4096)."""
  m = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  unknown = sorted(set(m) - _MODEL_FIELDS)
  if unknown:
    raise TrainError(f"unknown config key config.model.{unknown[0]} (not a ModelConfig field)")
  init = config.get("init")
  if not m.get("original_max_position_embeddings") and init and (init == "builtin" or os.path.exists(init)):
    try:
      m["original_max_position_embeddings"] = weights.original_length_of(weights.model_path(init))
    except ValueError as e:
      raise TrainError(f"config.init {init!r}: {str(e).splitlines()[0]}") from e
  try:
    return model_lib.ModelConfig(**m)
  except (TypeError, ValueError) as e:
    raise TrainError(f"config.model: {e}") from e


def stage_rope(stage_cfg: dict, model_cfg: model_lib.ModelConfig) -> rope_lib.RopeScaling:
  """A stage's RopeScaling: a method name (with rope_factor) or a factor file path (lrjax.factors), resolved by
  the one rule (rope.resolve): L = the model's original window, and a factor table without its own target
  takes s = stage length / L (the extension ratio sets the attention temperature)."""
  length = int(stage_cfg["length"]) if "length" in stage_cfg else None
  name = str(stage_cfg.get("rope", "default"))
  original = model_cfg.original_length
  if name in rope_lib.METHODS and name != "longrope":
    if name == "default":
      return rope_lib.RopeScaling()
    return rope_lib.resolve(rope_lib.RopeScaling(method=name, factor=float(stage_cfg.get("rope_factor", 1.0))),
                            original_length=original)
  if name == "longrope":
    raise TrainError("a longrope stage needs a factor file path as `rope` (searched factors), not the name")
  if not os.path.exists(name):
    raise TrainError(f"stage rope {name!r} is neither a method ({', '.join(rope_lib.METHODS)}) nor an "
                     "existing factor file")
  try:
    return factors.resolve_file(name, original_length=original, target_length=length,
                                n_layers=model_cfg.num_layers, rotary_dim=model_cfg.rotary_dim)
  except ValueError as e:
    raise TrainError(str(e).splitlines()[0]) from e


def parse_stages(config, model_cfg: model_lib.ModelConfig) -> list[Stage]:
  """Validate the whole stage list up front; every problem is one TrainError line naming the stage."""
  stages = []
  for i, s in enumerate(config.stages):
    s = s.to_dict() if hasattr(s, "to_dict") else dict(s)
    length, steps = int(s["length"]), int(s["steps"])
    block = max(1, min(model_cfg.block_q, length)) if model_cfg.attention == "blockwise" else 1
    if length % block:
      raise TrainError(f"stage {i}: length {length} is not divisible by the attention block {block} "
                       "(config.model.block_q)")
    if length % config.loss_chunk and length > config.loss_chunk:
      raise TrainError(f"stage {i}: length {length} is not divisible by loss_chunk {config.loss_chunk}")
    warmup = int(s.get("warmup_steps", 0))
    if not warmup < steps:
      raise TrainError(f"stage {i}: warmup_steps {warmup} must be in [0, steps={steps})")
    if not float(s["lr"]) > 0:
      raise TrainError(f"stage {i}: lr must be > 0, got {s['lr']}")
    stages.append(Stage(index=i, length=length, steps=steps, rope=stage_rope(s, model_cfg),
                        rope_name=str(s.get("rope", "default")), lr=float(s["lr"]),
                        schedule=s.get("schedule", "cosine"), warmup_steps=warmup,
                        end_lr_ratio=float(s.get("end_lr_ratio", 0.0))))
  return stages
