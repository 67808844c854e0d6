"""Training checkpoints: a thin wrapper around orbax's CheckpointManager.

One checkpoint per saved step, `<directory>/<step>/` with three items:
  state   the TrainState pytree (params, opt_state, step, rng, skipped), restored into given shardings
  data    the data-iterator state (JSON: stage, epoch, position)
  config  the run's config (JSON, for the record; never read back into the run)

Saves are asynchronous where orbax supports it (call `wait()` before reading them back or exiting) and
atomic: orbax writes into a temporary directory and renames it when complete, so a process killed during a
save leaves the previous checkpoint intact. `restore_latest` walks back from the newest step when a
checkpoint cannot be read, saying so in one line, and never deletes anything: the damaged step directory is
renamed to `<step>.unreadable` (kept for inspection, invisible to orbax) so that training can save that step
again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lrjax import sharding as sharding_lib

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (wrong shapes, unreadable); the message names the problem."""


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sharding_lib.path_name(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in leaves}


class Checkpointer:
  """Periodic, atomic, optionally asynchronous checkpoints of one run.

  Args:
    directory: where step directories go (created).
    keep: how many of the newest checkpoints to keep.
    async_save: save in a background thread (the arrays are copied first, so training may continue).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    # epath, not os.path: a gs:// directory must stay remote (orbax writes it through tensorstore).
    self.directory = epath.Path(directory) if "://" in str(directory) else epath.Path(os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front: item metadata is then readable before any save or restore in this process
    # (check_shapes), and orbax does not warn about items it would not know how to restore.
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
    """Start saving `state` as checkpoint `step`; returns whether a save was started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config))
    return self._manager.save(step, args=args, force=force)

  def wait(self) -> None:
    """Block until pending asynchronous saves are durable."""
    self._manager.wait_until_finished()

  def check_shapes(self, step: int, target: Any) -> None:
    """Raise CheckpointError naming the first tensor whose saved shape differs from `target`'s."""
    try:
      meta = self._manager.item_metadata(step)["state"]
    except Exception:  # metadata unreadable: restore will say why
      return
    if meta is None:
      return
    saved = _leaf_shapes(getattr(meta, "tree", meta))
    wanted = _leaf_shapes(target)
    for name, shape in wanted.items():
      if name in saved and saved[name] != shape:
        raise CheckpointError(f"checkpoint {self.directory}/{step} does not fit this model: {name} has shape "
                              f"{saved[name]} in the checkpoint but {shape} here")
    missing = sorted(set(wanted) - set(saved))
    if missing:
      raise CheckpointError(f"checkpoint {self.directory}/{step} lacks tensors {missing[:3]} of this model")

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restore checkpoint `step` into `target`'s structure, dtypes and shardings.

    Args:
      target: a pytree of arrays or jax.ShapeDtypeStruct (with .sharding) shaped like the saved state.
    Returns:
      (state, data_state).
    """
    self.check_shapes(step, target)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    return out["state"], dict(out["data"])

  def restore_latest(self, target: Any, *, report=print) -> tuple[int, Any, dict] | None:
    """The newest checkpoint that restores, or None when there is none.

    A checkpoint whose shapes do not match `target` raises CheckpointError (a wrong directory, not damage);
    any other failure is reported in one line, the step directory is moved aside to `<step>.unreadable` and
    the next older checkpoint is tried. Nothing is deleted.
    """
    steps = self.all_steps()
    for i, step in enumerate(reversed(steps)):
      try:
        state, data = self.restore(step, target)
      except CheckpointError:
        raise
      except Exception as e:  # damaged step directory: fall back to an older one
        older = steps[-2 - i] if i + 1 < len(steps) else None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        aside = self._move_aside(step)
        report(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: {first}); kept as "
               f"{aside.name}; " + (f"falling back to step {older}" if older is not None
                                    else "no older checkpoint left"))
        continue
      return step, state, data
    if steps:
      raise CheckpointError(f"no checkpoint in {self.directory} could be restored (steps {steps}); "
                            "nothing was deleted")
    return None

  def _move_aside(self, step: int) -> epath.Path:
    """Rename step directory `step` to `<step>.unreadable[.N]` (a name orbax does not read as a step)."""
    aside, n = self.directory / f"{step}.unreadable", 1
    while aside.exists():
      aside, n = self.directory / f"{step}.unreadable.{n}", n + 1
    (self.directory / str(step)).rename(aside)
    self._manager.reload()
    return aside

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
