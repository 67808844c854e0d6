"""Optimizer of a stage: global-norm clipping, then AdamW with warmup and a constant / linear / cosine decay
(optax's schedules, joined at the end of the warmup)."""

from __future__ import annotations

import jax
import optax

from lrjax.train.config import Stage


def learning_rate_schedule(stage: Stage) -> optax.Schedule:
  """lr·(n+1)/warmup for the first warmup steps, then constant, or linear / cosine decay from lr to
  lr·end_lr_ratio at the stage's last step."""
  lr, warm, end = stage.lr, stage.warmup_steps, stage.end_lr_ratio
  decay = max(stage.steps - warm, 1)
  main = {"constant": lambda: optax.constant_schedule(lr),
          "linear": lambda: optax.linear_schedule(lr, lr * end, decay),
          "cosine": lambda: optax.cosine_decay_schedule(lr, decay, alpha=end)}[stage.schedule]()
  if not warm:
    return main
  return optax.join_schedules([optax.linear_schedule(lr / warm, lr, warm - 1), main], [warm])


def _decay_mask(params):
  """Weight decay on weight matrices only (not on norms or biases)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not str(getattr(path[-1], "key", path[-1])).endswith(("norm", "bias")), params)


def make_optimizer(opt_cfg, stage: Stage) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with the stage's schedule."""
  o = opt_cfg.to_dict() if hasattr(opt_cfg, "to_dict") else dict(opt_cfg)
  return optax.chain(
      optax.clip_by_global_norm(float(o.get("grad_clip", 1.0))),
      optax.adamw(learning_rate_schedule(stage), b1=float(o.get("b1", 0.9)), b2=float(o.get("b2", 0.95)),
                  eps=float(o.get("eps", 1e-8)), weight_decay=float(o.get("weight_decay", 0.0)),
                  mask=_decay_mask))
