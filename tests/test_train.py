"""The train step and loop: loss vs an independent reference, exact gradient accumulation, 8-device == 1-device,
NaN guard, stages, metrics files, kill -9 / SIGTERM and resume, one-line errors for bad input."""

import csv
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import pretrain
from lrjax import checkpoint as checkpoint_lib
from lrjax import model as model_lib
from lrjax import stream as stream_lib
from lrjax import rope as rope_lib
from lrjax import sharding as sharding_lib
from lrjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO, "lrjax", "assets", "model")  # the shipped built-in model


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _tiny_config(**stage):
  c = pretrain.get_config("tiny")
  c.stages[0].update(**stage)
  return c


# ----------------------------------------------------------------------------------------------------------
# The step.

SMALL = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, max_position_embeddings=64, attention="xla")


def _stage(**kw):
  base = dict(index=0, length=16, steps=10, rope=rope_lib.RopeScaling(), rope_name="default", lr=1e-3,
              schedule="constant", warmup_steps=0, end_lr_ratio=0.0)
  base.update(kw)
  return train.Stage(**base)


def _batch(key, a, b, t, vocab):
  k1, k2 = jax.random.split(key)
  tokens = np.asarray(jax.random.randint(k1, (a, b, t + 1), 0, vocab), np.int32)
  weights = np.asarray(jax.random.uniform(k2, (a, b, t)) > 0.2, np.float32)  # some tokens masked out
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (a, b, t)).copy(), "weights": weights}


def _one_device_mesh():
  return sharding_lib.make_mesh({}, devices=jax.devices()[:1])


def _step_on(mesh, cfg, params, batch, rope, optimizer):
  with sharding_lib.mesh_context(mesh):
    state = train.init_state(cfg, optimizer, jax.random.PRNGKey(1), params=params)
    sh = train.state_shardings(mesh, jax.eval_shape(lambda: state), optimizer)
    state = jax.device_put(state, sh)
    batch = jax.device_put(batch, train.batch_sharding(mesh))
    step = train.jit_train_step(train.make_train_step(cfg, optimizer, loss_chunk=8), mesh, sh)
    new, metrics = step(state, batch, rope)
  return jax.device_get(new), jax.device_get(metrics)


@pytest.fixture(scope="module")
def step_setup():
  params = jax.device_get(model_lib.init_params(SMALL, jax.random.PRNGKey(0)))  # host copy: steps donate
  rope = jax.tree.map(jnp.asarray, SMALL.rope_arrays(seq_len=16))
  optimizer = train.make_optimizer({"weight_decay": 0.1}, _stage())
  batch = _batch(jax.random.PRNGKey(2), 1, 4, 16, SMALL.vocab_size)
  new, metrics = _step_on(_one_device_mesh(), SMALL, params, batch, rope, optimizer)
  return params, rope, optimizer, batch, new, metrics


@pytest.fixture(scope="module")
def sgd_base(step_setup):
  """One plain-SGD step (lr 1) on one device: its update is minus the gradient itself."""
  params, rope, _, batch, _, metrics = step_setup
  return _step_on(_one_device_mesh(), SMALL, params, batch, rope, optax.sgd(1.0))


def test_step_loss_equals_reference(step_setup):
  params, rope, _, batch, _, metrics = step_setup
  logits = np.asarray(model_lib.logits(SMALL, params, batch["inputs"][0], batch["positions"][0], rope),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["targets"][0][..., None], -1)[..., 0]
  w = batch["weights"][0]
  np.testing.assert_allclose(metrics["loss"], (nll * w).sum() / w.sum(), rtol=2e-6)
  assert metrics["tokens"] == w.sum() and metrics["finite"]


def test_gradient_accumulation_equals_full_batch(step_setup, sgd_base):
  params, rope, optimizer, batch, new, metrics = step_setup
  # Plain SGD with lr 1 makes the update the gradient itself (Adam's first step is ~sign(g), too sensitive).
  sgd = optax.sgd(1.0)
  full, metrics1 = sgd_base
  split = {k: v.reshape(2, 2, *v.shape[2:]) for k, v in batch.items()}  # 2 microbatches of 2
  new2, metrics2 = _step_on(_one_device_mesh(), SMALL, params, split, rope, sgd)
  np.testing.assert_allclose(metrics2["loss"], metrics1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics2["grad_norm"], metrics1["grad_norm"], rtol=1e-5)
  for a, b, p in zip(jax.tree.leaves(new2.params), jax.tree.leaves(full.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a - p, b - p, atol=1e-7)


def test_eight_device_step_equals_one_device(step_setup, sgd_base):
  params, rope, optimizer, batch, new, metrics = step_setup
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  new8, metrics8 = _step_on(mesh, SMALL, params, batch, rope, optimizer)
  np.testing.assert_allclose(metrics8["loss"], metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new8), jax.tree.leaves(new)):  # params, Adam moments, step, rng
    np.testing.assert_allclose(a, b, atol=1e-5)
  # The gradient itself (SGD with lr 1), much tighter.
  one, _ = sgd_base
  eight, _ = _step_on(mesh, SMALL, params, batch, rope, optax.sgd(1.0))
  for a, b, p in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a - p, b - p, atol=1e-7)


def test_remat_and_bf16_compute(step_setup, sgd_base):
  params, rope, _, batch, _, metrics = step_setup
  sgd = optax.sgd(1.0)
  base, _ = sgd_base
  # Rematerialisation recomputes activations: the same gradient.
  remat, m_remat = _step_on(_one_device_mesh(), SMALL.replace(remat="full"), params, batch, rope, sgd)
  np.testing.assert_allclose(m_remat["loss"], metrics["loss"], rtol=1e-6)
  for a, b, p in zip(jax.tree.leaves(remat.params), jax.tree.leaves(base.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a - p, b - p, atol=1e-7)
  # bf16 compute, f32 master weights: params and updates stay f32, the loss is close to the f32 loss.
  bf16, m_bf16 = _step_on(_one_device_mesh(), SMALL.replace(dtype="bfloat16"), params, batch, rope, sgd)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.params))
  np.testing.assert_allclose(m_bf16["loss"], metrics["loss"], rtol=1e-2)
  g32 = np.concatenate([(b - p).ravel() for b, p in zip(jax.tree.leaves(base.params), jax.tree.leaves(params))])
  g16 = np.concatenate([(b - p).ravel() for b, p in zip(jax.tree.leaves(bf16.params), jax.tree.leaves(params))])
  assert np.dot(g16, g32) / (np.linalg.norm(g16) * np.linalg.norm(g32)) > 0.99


def test_schedules():
  warm = train.learning_rate_schedule(_stage(lr=1.0, steps=10, warmup_steps=4, schedule="linear",
                                             end_lr_ratio=0.1))
  np.testing.assert_allclose([float(warm(i)) for i in (0, 3, 4, 7, 10)], [0.25, 1.0, 1.0, 0.55, 0.1],
                             rtol=1e-6)
  cos = train.learning_rate_schedule(_stage(lr=2.0, steps=10, schedule="cosine", end_lr_ratio=0.0))
  np.testing.assert_allclose([float(cos(i)) for i in (0, 5, 10)], [2.0, 1.0, 0.0], atol=1e-6)
  const = train.learning_rate_schedule(_stage(lr=3.0, schedule="constant"))
  assert float(const(9)) == 3.0


def test_flops_formula_by_hand():
  c = SMALL
  matmul = c.num_layers * (32 * 16 * (4 + 2 + 2) + 4 * 16 * 32 + 3 * 32 * 64) + 32 * 64  # q,k,v,o, mlp, head
  assert train.flops_per_token(c, 16) == 6 * matmul + 6 * 2 * 16 * 4 * 16


# ----------------------------------------------------------------------------------------------------------
# The loop (tiny config on the built-in corpus, 8 simulated devices).

STEPS = 20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  lines = []
  out = train.train(_tiny_config(steps=STEPS), workdir, report=lines.append, progress=False)
  return workdir, out, lines


def test_loss_falls_and_metrics_files(tiny_run):
  workdir, out, _ = tiny_run
  rows = _csv(os.path.join(workdir, "metrics.csv"))
  assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
  losses = [float(r["loss"]) for r in rows]
  assert abs(losses[0] - np.log(256)) < 0.1  # random init: about uniform over bytes
  assert np.mean(losses[-5:]) < losses[0] - 1.0
  assert out["step"] == STEPS and out["skipped"] == 0
  assert all(float(r["tokens"]) == 8 * 32 for r in rows)
  # TensorBoard: read the TFRecords and decode the events with protobuf descriptors built here.
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  fdp = descriptor_pb2.FileDescriptorProto(name="ev.proto", package="t")
  value = fdp.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=9, label=1)
  value.field.add(name="simple_value", number=2, type=2, label=1)
  summ = fdp.message_type.add(name="Summary")
  summ.field.add(name="value", number=1, type=11, label=3, type_name=".t.Value")
  ev = fdp.message_type.add(name="Event")
  ev.field.add(name="wall_time", number=1, type=1, label=1)
  ev.field.add(name="step", number=2, type=3, label=1)
  ev.field.add(name="file_version", number=3, type=9, label=1)
  ev.field.add(name="summary", number=5, type=11, label=1, type_name=".t.Summary")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  Event = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))
  (path,) = [os.path.join(workdir, "tensorboard", f) for f in os.listdir(os.path.join(workdir, "tensorboard"))]
  events = [Event.FromString(r) for r in _tfrecords(path)]
  assert events[0].file_version == "brain.Event:2"
  by_step = {}
  for e in events[1:]:
    by_step.setdefault(e.step, {}).update({v.tag: v.simple_value for v in e.summary.value})
  assert sorted(by_step) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(by_step[STEPS]["train/loss"], losses[-1], rtol=1e-6)
  assert "perf/mfu" in by_step[STEPS] and "train/lr" in by_step[STEPS]
  with open(os.path.join(workdir, "loss.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _tfrecords(path):
  """Payloads of a TFRecord file: uint64 length, uint32 length CRC, payload, uint32 payload CRC."""
  import struct
  with open(path, "rb") as f:
    data = f.read()
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def test_nan_guard_skip_and_stop(tmp_path):
  # A negative RMSNorm epsilon makes rsqrt(mean(x^2) + eps) NaN for small activations: every step is bad.
  c = _tiny_config(steps=2, warmup_steps=0)
  c.model.rms_norm_eps = -1.0
  lines = []
  out = train.train(c, str(tmp_path / "skip"), report=lines.append, progress=False)
  assert out["skipped"] == 2
  assert any(l.startswith("step 1: non-finite") for l in lines) and any(l.startswith("step 2:") for l in lines)
  init = model_lib.init_params(train.model_config(c), jax.random.PRNGKey(c.seed))
  for a, b in zip(jax.tree.leaves(jax.device_get(out["state"].params)), jax.tree.leaves(init)):
    np.testing.assert_array_equal(a, b)  # params untouched
  c.nan_policy = "stop"
  c.stages[0].steps = 1
  with pytest.raises(train.NonFiniteError, match=r"^step 1: non-finite .*stopping"):
    train.train(c, str(tmp_path / "stop"), report=lambda _: None, progress=False)


def test_stage_switch_changes_length_and_factors(tmp_path):
  # From the shipped (trained) model, so that the RoPE setting visibly matters: 1 step at 32 tokens with plain
  # RoPE, then 1 step at 64 tokens with linear interpolation by 2.
  c = pretrain.get_config()
  c.init = MODEL_DIR
  c.batch_size = 8
  c.stages[0].update(length=32, steps=1, warmup_steps=0, schedule="constant", lr=1e-3)
  c.stages.append(dict(c.stages[0].to_dict(), length=64, rope="linear", rope_factor=2.0))
  lines = []
  train.train(c, str(tmp_path), report=lines.append, progress=False)
  assert any("stage 1: 1 steps at length 64, rope linear" in l for l in lines)
  rows = _csv(tmp_path / "metrics.csv")
  assert [float(r["tokens"]) for r in rows] == [8 * 32, 8 * 64]
  # Stage 1's loss, recomputed here from stage 0's final checkpoint, stage 1's first batch and linear scaling
  # by 2 (and not the default rope).
  cfg = train.model_config(c)
  ck = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert ck.all_steps() == [1, 2]
  opt = train.make_optimizer(c.optimizer, _stage())
  target = jax.eval_shape(lambda: train.init_state(cfg, opt, jax.random.PRNGKey(0)))
  state, data = ck.restore(1, target)
  ck.close()
  from lrjax import tokenizers
  parts = train.components(c.data, tokenizers.load_tokenizer("byte"))
  shards = jax.device_count()  # data=-1: one row shard per device
  first = []
  for s in range(shards):   # the first global batch of stage 1: every row shard's first rows
    with stream_lib.batches(parts, length=64, global_batch=8, seed=c.seed + 1000, shard_index=s,
                            shard_count=shards) as it:
      first.append(next(it))
  b = {k: np.concatenate([r[k] for r in first]) for k in ("inputs", "targets", "positions")}

  def ref_loss(scaling):
    rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(scaling, seq_len=64))
    logits = np.asarray(model_lib.logits(cfg, state.params, b["inputs"], b["positions"], rope), np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, b["targets"][..., None], -1).mean()

  linear = rope_lib.RopeScaling(method="linear", factor=2.0, original_max_position_embeddings=256)
  np.testing.assert_allclose(float(rows[1]["loss"]), ref_loss(linear), rtol=1e-5)
  assert abs(ref_loss(rope_lib.RopeScaling()) - ref_loss(linear)) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing lost.


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.data.update(source="/nonexistent/corpus.jsonl"), "no such file or directory"),
    (lambda c: c.stages[0].update(steps=0), r"config key config.stages\[0\].steps must be >= 1, got 0"),
    (lambda c: c.stages[0].update(rope="/nonexistent/factors.json"), "neither a method"),
    (lambda c: c.model.update(attention="blockwise", block_q=24), "not divisible by the attention block"),
    (lambda c: c.stages[0].update(warmup_steps=50), "warmup_steps 50"),
    (lambda c: c.update(nan_policy="ignore"), "nan_policy"),
])
def test_bad_config_is_one_clear_error(tmp_path, edit, message):
  c = _tiny_config()
  edit(c)
  with pytest.raises(ValueError, match=message) as e:
    train.train(c, str(tmp_path), report=lambda _: None, progress=False)
  assert "\n" not in str(e.value)


def test_unknown_key_is_an_error(tmp_path):
  c = _tiny_config()
  with c.unlocked():
    c.optimizer.momentum = 0.9
  with pytest.raises(train.TrainError, match=r"unknown config key config.optimizer.momentum \(nothing reads it\)"):
    train.train(c, str(tmp_path), report=lambda _: None, progress=False)


def test_empty_corpus(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text('{"id": "a", "text": ""}\n')
  c = _tiny_config()
  c.data.source = str(path)
  with pytest.raises(stream_lib.StreamError, match="0 documents"):
    train.train(c, str(tmp_path / "w"), report=lambda _: None, progress=False)


def test_checkpoint_of_another_shape_is_refused_and_kept(tiny_run):
  workdir, _, _ = tiny_run
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  c = _tiny_config(steps=STEPS + 5)
  c.model.hidden_size = 48
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"params/embed has shape \(256, 32\) in the "
                     r"checkpoint but \(256, 48\) here"):
    train.train(c, workdir, report=lambda _: None, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


# ----------------------------------------------------------------------------------------------------------
# The experiment script as a subprocess: kill -9 and resume, SIGTERM, one-line errors.


def _script(workdir, *extra, steps=STEPS):
  return [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--config=configs/pretrain.py:tiny",
          f"--workdir={workdir}", f"--config.stages[0].steps={steps}", *extra]


def _wait_for(path, proc, timeout=300):
  t0 = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, f"the run ended before {path} appeared"
    assert time.time() - t0 < timeout, f"{path} did not appear"
    time.sleep(0.02)


def test_kill9_then_resume_gives_identical_losses(tiny_run, tmp_path):
  reference = [r["loss"] for r in _csv(os.path.join(tiny_run[0], "metrics.csv"))]
  workdir = str(tmp_path)
  proc = subprocess.Popen(_script(workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _wait_for(os.path.join(workdir, "checkpoints", "10"), proc)
  proc.kill()  # SIGKILL: no chance to clean up
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  done = subprocess.run(_script(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "resumed from" in done.stdout
  losses = [r["loss"] for r in _csv(os.path.join(workdir, "metrics.csv"))]
  assert losses == reference  # bitwise: the CSV holds repr(float)


def test_sigterm_saves_and_stops_cleanly(tmp_path):
  # In this process (the loop's handler runs on the main thread): SIGTERM once the first checkpoint exists.
  import threading
  workdir = str(tmp_path)

  def send():
    while not os.path.exists(os.path.join(workdir, "checkpoints", "10")):
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=send, daemon=True).start()
  lines = []
  out = train.train(_tiny_config(steps=100000), workdir, report=lines.append, progress=False)
  assert out["preempted"] and 10 <= out["step"] < 100000
  assert lines[-1] == f"SIGTERM received: saved checkpoint at step {out['step']}; exiting"
  ck = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.all_steps()[-1] == out["step"]
  ck.close()
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_script_bad_input_prints_one_line(tmp_path):
  r = subprocess.run(_script(str(tmp_path), "--config.data.source=/nonexistent.jsonl"), cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("error: data source '/nonexistent.jsonl': no such file")


# ----------------------------------------------------------------------------------------------------------
# The shipped built-in model (lrjax/assets/model, made by configs/pretrain.py).



def test_shipped_model_loads_alike_in_lrjax_and_transformers():
  import torch
  import transformers
  from lrjax import data as data_lib
  from lrjax import tokenizers
  from lrjax import weights
  cfg, params = weights.load(MODEL_DIR)
  assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta) == (256, 256, 64, 10000.0)
  assert cfg.rope_scaling.method == "default"
  docs = data_lib.tokenized_documents("builtin:test", tokenizers.load_tokenizer("byte"), min_tokens=257)
  tokens = np.stack([d[:257] for d in docs])  # one 256-token window per held-out document
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  positions = np.broadcast_to(np.arange(256, dtype=np.int32), inputs.shape)
  rope = jax.tree.map(jnp.asarray, cfg.rope_arrays(seq_len=256))
  ours = np.asarray(model_lib.logits(cfg, params, inputs, positions, rope))
  hf = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(inputs.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  m = theirs.max(-1, keepdims=True)
  logp = theirs - m - np.log(np.exp(theirs - m).sum(-1, keepdims=True))
  held_out = -np.take_along_axis(logp, targets[..., None], -1).mean()  # nats per byte
  assert held_out < 0.45 * np.log(256), held_out  # uniform is ln 256 = 5.55 nats


def test_sequence_parallel_ring_training_equals_plain_attention(tmp_path):
  """Ring attention on (data=2, sequence=4), zig-zag balanced by the loop, gives the losses of plain blockwise
  attention on the same mesh (XLA gathering the sequence; the same 2 row shards of data)."""
  losses = {}
  for name, attention in (("plain", "blockwise"), ("ring", "ring")):
    mesh = dict(data=2, fsdp=1, sequence=4, tensor=1)
    c = _tiny_config(steps=3, warmup_steps=0)
    c.model.attention = attention
    c.mesh.update(**mesh)
    c.checkpoint_every = 100
    train.train(c, str(tmp_path / name), report=lambda _: None, progress=False)
    losses[name] = [float(r["loss"]) for r in _csv(tmp_path / name / "metrics.csv")]
  np.testing.assert_allclose(losses["ring"], losses["plain"], rtol=1e-5)
  cfg = train.model_config(_tiny_config())
  assert train.balance_order(cfg.replace(attention="ring"), jax.make_mesh((2, 4), ("data", "sequence"))) == "zigzag"
  assert train.balance_order(cfg, jax.make_mesh((8,), ("data",))) == "none"
