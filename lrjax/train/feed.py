"""Training input per process: the rows and columns of every global batch that this process's devices own.

A global batch is [A, B/A, T] arrays (A microbatches of B/A rows of T tokens) sharded P(None, (data, fsdp),
sequence). Its S = data * fsdp distinct row slices are the "row shards": shard s's rows come from its own
lrjax.stream pipeline (shard s of S), so every process computes exactly the shards its devices hold, the same
way on every process (deterministic from the seed and the batch index). When the sequence axis spans
processes, each process builds its shards' full rows (zig-zag load balancing is a permutation of the whole
length, positions travelling with their tokens) and hands each device only its column slice, through
jax.make_array_from_callback. The iterator state is the same on every shard and every process.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import NamedSharding

from lrjax import ring as ring_lib
from lrjax import sharding as sharding_lib
from lrjax import stream as stream_lib
from lrjax.train.config import Stage, TrainError
from lrjax.train.step import BATCH_KEYS


def batch_keys(options: dict) -> tuple[str, ...]:
  """The batch arrays the step reads for these stream options (segment ids with document masks; the
  original-RoPE flags of LongRoPE2's mixed window)."""
  return BATCH_KEYS + (("segment_ids",) if options.get("document_mask") else ()) + \
      (("original_rope",) if options.get("original_length") else ())


def check_batch(batch_size: int, accumulation: int, mesh) -> int:
  """Rows each row shard contributes to one microbatch; one TrainError line naming the fix otherwise."""
  shards = sharding_lib.axis_size(mesh, tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.axis_names))
  if batch_size % (accumulation * shards):
    per = accumulation * shards
    raise TrainError(f"batch_size {batch_size} with accumulation {accumulation} over {shards} data-parallel row "
                     f"shards (mesh data x fsdp) needs a multiple of {per} rows (every microbatch gives each shard "
                     f"the same whole rows): set batch_size to a multiple of {per} or lower accumulation")
  return batch_size // (accumulation * shards)


def owned_shards(sharding: NamedSharding, shape: tuple[int, int, int], rows_per_shard: int) -> list[int]:
  """The row shards whose rows this process's devices hold."""
  starts = {index[1].start or 0 for index in sharding.addressable_devices_indices_map(shape).values()}
  return sorted(start // rows_per_shard for start in starts)


class Feed:
  """Global batches of one stage for this process: next(feed) -> {key: jax.Array [A, B/A, T]}.

  Args:
    components: the data (lrjax.stream.Component list).
    stage: the stage (length T).
    mesh, sharding: where the batch goes (step.batch_sharding(mesh)).
    batch_size, accumulation: B and A.
    seed: the stage's data seed.
    order: causal load balancing along T ("none" or "zigzag"), applied once per batch.
    data_options: stream options (reset_positions, document_mask, original_length, separator, num_workers).
    state: a Feed.state() to resume from.
  """

  def __init__(self, components, stage: Stage, mesh, sharding: NamedSharding, *, batch_size: int,
               accumulation: int, seed: int, order: str = "none", data_options: dict | None = None,
               state: dict | None = None):
    self.rows = check_batch(batch_size, accumulation, mesh)
    self.shape = (accumulation, batch_size // accumulation, stage.length)
    self.sharding, self.order, self.accumulation = sharding, order, accumulation
    self.sequence = mesh.shape.get(sharding_lib.SEQUENCE_AXIS, 1)
    n_shards = self.shape[1] // self.rows
    options = dict(data_options or {})
    self.keys = batch_keys(options)
    self.iterators = {s: stream_lib.batches(components, length=stage.length, global_batch=batch_size, seed=seed,
                                            shard_index=s, shard_count=n_shards, state=state, **options)
                      for s in owned_shards(sharding, self.shape, self.rows)}

  def _host(self, batch: dict) -> dict:
    """[A * rows, T] stream rows -> load-balanced [A, rows, T] arrays of the keys the step reads."""
    out = {k: batch[k] for k in self.keys}
    if self.order != "none":
      out = ring_lib.load_balance(out, self.sequence, self.order)
    return {k: v.reshape(self.accumulation, self.rows, v.shape[-1]) for k, v in out.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    host = {s: self._host(next(it)) for s, it in self.iterators.items()}

    def assemble(key):
      def shard_of(index):
        rows, cols = index[1], index[2]
        return host[(rows.start or 0) // self.rows][key][:, :, cols]
      dtype = host[next(iter(host))][key].dtype
      return jax.make_array_from_callback(self.shape, self.sharding, lambda index: shard_of(index).astype(dtype))

    return {k: assemble(k) for k in self.keys}

  def state(self) -> dict:
    """The same on every shard and process (lrjax.stream: the batch index and the plan's fingerprint)."""
    return next(iter(self.iterators.values())).state()

  def close(self) -> None:
    for it in self.iterators.values():
      it.close()


def components(data_cfg, tokenizer) -> list:
  """The stream components of config.data: one source, or a weighted mixture with length filters."""
  specs = ([str(data_cfg.source)] if data_cfg.source else
           [{k: v for k, v in m.items() if not (k == "max_tokens" and not v)} for m in data_cfg.mixture])
  return [stream_lib.open_component(spec, tokenizer) for spec in specs]


def stream_options(data_cfg) -> dict:
  separator = data_cfg.get("separator")
  return {"reset_positions": bool(data_cfg.reset_positions), "document_mask": bool(data_cfg.document_mask),
          "original_length": int(data_cfg.mixed_original_length) or None,
          "separator": None if separator is None else tuple(int(s) for s in separator),
          "num_workers": int(data_cfg.num_workers)}
