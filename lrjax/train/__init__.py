"""Training and fine-tuning: a jitted, sharded, donated train step and a resumable, multi-stage,
multi-process loop.

  config    the config schema, the model, stages and their RoPE settings
  optim     clipping + AdamW with warmup and constant / linear / cosine decay (optax schedules)
  step      the train state, the step (gradient accumulation, NaN guard), shardings, FLOPs
  feed      per-process input: the batch shards a process's devices own, from lrjax.stream
  metrics   metrics.csv, TensorBoard events, loss.png
  loop      stages, checkpoints, preemption, export
"""

from lrjax.train.config import (NAN_POLICIES, SCHEDULES, SCHEMA, NonFiniteError, Stage, TrainError, model_config,
                                    parse_stages, stage_rope, validate_config)
from lrjax.train.feed import Feed, check_batch, components, stream_options
from lrjax.train.loop import Preemption, balance_order, describe, export_hf, train
from lrjax.train.metrics import CSV_FIELDS, MetricsLog, plot_metrics
from lrjax.train.optim import learning_rate_schedule, make_optimizer
from lrjax.train.step import (BATCH_KEYS, TrainState, batch_sharding, flops_per_token, init_state,
                                  jit_train_step, loss_sums, make_train_step, measure_peak_flops, state_shardings)
