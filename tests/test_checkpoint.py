"""Checkpoints: exact round trip into the same shardings, fallback past a damaged newest step, interrupted saves,
a checkpoint of another shape refused in one line, nothing ever deleted by a failed restore."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax import checkpoint as checkpoint_lib
from lrjax import model as model_lib
from lrjax import sharding as sharding_lib
from lrjax import train

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, max_position_embeddings=64)
OPT = optax.adamw(1e-3)


def _state(cfg, seed):
  """A TrainState on 8 devices (fsdp=4 x tensor=2) with non-trivial optimizer moments."""
  mesh = sharding_lib.make_mesh({"fsdp": 4, "tensor": 2})
  state = train.init_state(cfg, OPT, jax.random.PRNGKey(seed))
  moments = jax.tree.map(lambda p: p * 0.5 + 0.25, state.params)
  state = state.replace(opt_state=(state.opt_state[0]._replace(mu=moments, nu=moments), *state.opt_state[1:]),
                        step=jnp.asarray(7, jnp.int32))
  sh = train.state_shardings(mesh, jax.eval_shape(lambda: state), OPT)
  return jax.device_put(state, sh), sh


def _target(cfg, seed=0):
  state, sh = _state(cfg, seed)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sh)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Three checkpoints (steps 1, 2, 3) of different states, saved asynchronously."""
  directory = str(tmp_path_factory.mktemp("ck"))
  ck = checkpoint_lib.Checkpointer(directory, keep=5, async_save=True)
  states = {}
  for step in (1, 2, 3):
    state, _ = _state(CFG, seed=step)
    states[step] = jax.device_get(state)
    assert ck.save(step, state, {"stage": 0, "epoch": step, "position": 10 * step}, {"note": "test"})
  ck.close()
  return directory, states


def test_round_trip_is_exact_and_keeps_shardings(saved):
  directory, states = saved
  ck = checkpoint_lib.Checkpointer(directory)
  target = _target(CFG)
  step, state, data = ck.restore_latest(target)
  ck.close()
  assert step == 3 and data == {"stage": 0, "epoch": 3, "position": 30}
  for got, want, t in zip(jax.tree.leaves(state), jax.tree.leaves(states[3]), jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding == t.sharding
  assert int(state.step) == 7


def _copy_tree(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def test_damaged_newest_falls_back_keeps_it_aside_and_training_saves_that_step_again(saved, tmp_path):
  directory = _copy_tree(saved[0], str(tmp_path / "ck"))
  for root, _, files in os.walk(os.path.join(directory, "3", "state")):
    for f in files:  # truncate every array file of the newest checkpoint
      open(os.path.join(root, f), "wb").close()
  damaged_files = sorted(os.listdir(os.path.join(directory, "3")))
  lines = []
  ck = checkpoint_lib.Checkpointer(directory)
  step, state, data = ck.restore_latest(_target(CFG), report=lines.append)
  assert step == 2 and data["position"] == 20
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(saved[1][2])):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert len(lines) == 1 and lines[0].startswith(f"checkpoint {directory}/3 is unreadable")
  assert lines[0].endswith("kept as 3.unreadable; falling back to step 2")
  assert sorted(os.listdir(os.path.join(directory, "3.unreadable"))) == damaged_files  # nothing deleted
  # The resumed run reaches step 3 again and saves it (this used to fail: "Checkpoint for step 3 already exists").
  assert ck.all_steps() == [1, 2]
  assert ck.save(3, state, {"position": 30}, {}, force=True)
  ck.close()
  ck = checkpoint_lib.Checkpointer(directory)
  assert ck.all_steps() == [1, 2, 3] and ck.restore_latest(_target(CFG))[2]["position"] == 30
  ck.close()


def test_interrupted_save_is_invisible(saved, tmp_path):
  # A process killed during a save leaves orbax's temporary directory, never a finalized step.
  directory = _copy_tree(saved[0], str(tmp_path / "ck"))
  partial = os.path.join(directory, "4.orbax-checkpoint-tmp-1234")
  _copy_tree(os.path.join(directory, "3"), partial)
  os.remove(os.path.join(partial, "_CHECKPOINT_METADATA")) if os.path.exists(
      os.path.join(partial, "_CHECKPOINT_METADATA")) else None
  ck = checkpoint_lib.Checkpointer(directory)
  assert ck.all_steps() == [1, 2, 3]
  step, _, _ = ck.restore_latest(_target(CFG))
  ck.close()
  assert step == 3


def test_other_shape_is_one_line_naming_the_tensor(saved):
  directory, _ = saved
  before = sorted(os.listdir(directory))
  ck = checkpoint_lib.Checkpointer(directory)
  other = CFG.replace(intermediate_size=128)
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    ck.restore_latest(_target(other))
  ck.close()
  msg = str(e.value)
  assert "\n" not in msg
  assert "params/layers/down has shape (2, 64, 32) in the checkpoint but (2, 128, 32) here" in msg
  assert sorted(os.listdir(directory)) == before


def test_empty_directory_restores_nothing(tmp_path):
  ck = checkpoint_lib.Checkpointer(str(tmp_path / "none"))
  assert ck.restore_latest(_target(CFG)) is None
  ck.close()
