"""Perplexity against references written here: full-logits NLL, and HF-style truncate / sliding loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lrjax import evaluate
from lrjax import perplexity as ppl_lib, model as model_lib, rope as rope_lib, sharding as sharding_lib

CFG = model_lib.ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, max_position_embeddings=16, block_q=8, block_k=8)
DYNAMIC = rope_lib.RopeScaling("dynamic", factor=2.0)  # frequencies depend on the sequence length


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def logits_fn():
  return jax.jit(lambda p, tokens, rope: model_lib.logits(
      CFG, p, tokens, jnp.arange(tokens.shape[1])[None], rope))


def _docs(lengths, seed=0, bos=None):
  rs = np.random.RandomState(seed)
  docs = [rs.randint(1 if bos is not None else 0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  if bos is not None:
    docs = [np.concatenate([[bos], d]).astype(np.int32) for d in docs]
  return docs


def _nll_of(logits_fn, params, ids, scored, scaling):
  """Summed NLL (float64) of predicting ids[j] for j in `scored`, one window, full logits."""
  ids = np.asarray(ids, np.int32)
  rope = jax.tree.map(jnp.asarray, CFG.rope_arrays(scaling, seq_len=len(ids)))
  logp = jax.nn.log_softmax(np.asarray(logits_fn(params, ids[None], rope), np.float64)[0], -1)
  return -sum(logp[j - 1, ids[j]] for j in scored), len(scored)


def test_window_nll_equals_full_logits(params, logits_fn):
  rs = np.random.RandomState(1)
  tokens = rs.randint(0, CFG.vocab_size, (2, 24)).astype(np.int32)
  weights = (rs.rand(2, 23) > 0.3).astype(np.float32)
  rope = jax.tree.map(jnp.asarray, CFG.rope_arrays(DYNAMIC, seq_len=24))
  logp = jax.nn.log_softmax(logits_fn(params, tokens, rope), -1)
  ref = -(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * weights).sum(-1)
  for chunk in (None, 5):  # 5 does not divide 24: padded chunks
    fn = jax.jit(lambda p, t, r, w: ppl_lib.window_nll(CFG, p, t, r, weights=w, chunk=chunk))
    nll, count = fn(params, tokens, rope, weights)
    np.testing.assert_allclose(nll, ref, rtol=2e-5)
    np.testing.assert_allclose(count, weights.sum(-1))
  nll, count = jax.jit(lambda p, t, r: ppl_lib.window_nll(CFG, p, t, r))(params, tokens, rope)
  full = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0].sum(-1)
  np.testing.assert_allclose(nll, full, rtol=2e-5)
  np.testing.assert_allclose(count, [23, 23])


def _reference(logits_fn, params, docs, length, bos, scaling, stride=None):
  """HF/Press et al. loop: per window (sum NLL, count), one window at a time, no padding."""
  out = []
  for doc in docs:
    body = list(doc[1:] if bos is not None else doc)
    width = length - (bos is not None)
    starts = [0] if stride is None else range(0, len(body), stride)
    prev_end = 0
    for begin in starts:
      end = min(begin + width, len(body))
      trg_len = end - prev_end
      ids = ([bos] if bos is not None else []) + body[begin:end]
      labels_from = len(ids) - trg_len  # labels[:-trg_len] = -100
      scored = [j for j in range(max(1, labels_from), len(ids))]
      out.append(_nll_of(logits_fn, params, ids, scored, scaling))
      prev_end = end
      if end == len(body):
        break
  return np.asarray(out, np.float64)


@pytest.mark.parametrize("bos", [None, 255])
def test_truncate_matches_reference(params, logits_fn, bos):
  docs = _docs([30, 20, 41], seed=2, bos=bos)
  res = ppl_lib.perplexity(CFG, params, docs, length=20, rope=DYNAMIC, protocol="truncate", batch_size=2,
                            bos_id=bos)
  ref = _reference(logits_fn, params, docs, 20, bos, DYNAMIC)
  assert res.num_windows == 3 and res.num_documents == 3
  np.testing.assert_allclose(res.window_count, ref[:, 1])
  np.testing.assert_allclose(res.window_nll, ref[:, 0], rtol=3e-5)
  np.testing.assert_allclose(res.ppl, np.exp(np.mean(ref[:, 0] / ref[:, 1])), rtol=3e-5)
  np.testing.assert_allclose(res.token_ppl, np.exp(ref[:, 0].sum() / ref[:, 1].sum()), rtol=3e-5)
  assert (res.window_count == 19).all()  # L - 1 targets, BOS or not


@pytest.mark.parametrize("bos", [None, 255])
def test_sliding_matches_reference(params, logits_fn, bos):
  docs = _docs([45, 20, 33], seed=3, bos=bos)
  res = ppl_lib.perplexity(CFG, params, docs, length=20, rope=DYNAMIC, protocol="sliding", stride=7,
                            batch_size=3, bos_id=bos)
  ref = _reference(logits_fn, params, docs, 20, bos, DYNAMIC, stride=7)
  _check_against_reference(res, ref)
  # every body token but an initial one without BOS is scored exactly once
  assert res.count == sum(len(d) - 1 for d in docs)


@pytest.mark.parametrize("bos", [None, 255])
def test_stride_beyond_the_window_samples_disjoint_windows(params, logits_fn, bos):
  """The paper's Books3 protocol (a 256k stride at 8k): stride > L - 1 gives disjoint windows, each fully scored
  and the tokens between them unscored, exactly as the official (HF-style) loop does."""
  docs = _docs([80, 20, 61], seed=5, bos=bos)
  res = ppl_lib.perplexity(CFG, params, docs, length=20, rope=DYNAMIC, protocol="sliding", stride=25,
                            batch_size=2, bos_id=bos)
  ref = _reference(logits_fn, params, docs, 20, bos, DYNAMIC, stride=25)
  _check_against_reference(res, ref)
  assert res.num_windows == 4 + 1 + 3 and res.count < sum(len(d) - 1 for d in docs)


@pytest.mark.parametrize("bos", [None, 255])
def test_short_documents_kept_as_one_shorter_window(params, logits_fn, bos):
  """PG19: the paper scores the whole test split; a book shorter than the window is one shorter window."""
  docs = _docs([12, 45, 7], seed=6, bos=bos)
  res = ppl_lib.perplexity(CFG, params, docs, length=20, rope=DYNAMIC, protocol="sliding", stride=7,
                            batch_size=2, bos_id=bos, short_documents="keep")
  _check_against_reference(res, _reference(logits_fn, params, docs, 20, bos, DYNAMIC, stride=7))
  assert res.num_documents == 3


def _check_against_reference(res, ref):
  assert res.num_windows == len(ref)
  np.testing.assert_allclose(res.window_count, ref[:, 1])
  np.testing.assert_allclose(res.window_nll, ref[:, 0], rtol=3e-5)
  np.testing.assert_allclose(res.ppl, np.exp(np.mean(ref[:, 0] / ref[:, 1])), rtol=3e-5)
  np.testing.assert_allclose(res.token_ppl, np.exp(ref[:, 0].sum() / ref[:, 1].sum()), rtol=3e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=4), st.integers(2, 16), st.integers(1, 15),
       st.booleans())
def test_sliding_scores_every_token_once(lengths, length, stride, bos):
  stride = min(stride, length - 1)
  bos_id = 7 if bos else None
  docs = [np.arange(n, dtype=np.int32) % 5 + 10 for n in lengths]  # ids never equal bos_id
  if bos:
    docs = [np.concatenate([[bos_id], d]).astype(np.int32) for d in docs]
  windows = ppl_lib.plan_windows(lengths, length, protocol="sliding", stride=stride, bos=bos)
  tokens, weights, sizes = ppl_lib.window_arrays(docs, windows, length, bos_id)
  scored = [np.zeros(n, int) for n in lengths]
  for win, w, n in zip(windows, weights, sizes):
    off = int(bos)
    assert n == win.end - win.start + off <= length
    for j in np.nonzero(w)[0]:  # target j predicts window token j + 1 = body token start + j + 1 - off
      scored[win.doc][win.start + j + 1 - off] += 1
  for n, s in zip(lengths, scored):
    expected = np.ones(n, int)
    if not bos:
      expected[0] = 0  # nothing predicts a document's first token
    np.testing.assert_array_equal(s, expected)


def test_new_factors_do_not_recompile(params):
  events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: events.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
  docs = _docs([24, 24, 24], seed=4)
  rs = np.random.RandomState(5)
  scalings = [rope_lib.RopeScaling("longrope", factor=2.0, long_factor=1 + rs.rand(CFG.rotary_dim // 2) * 3,
                                   original_max_position_embeddings=16) for _ in range(3)]
  results = []
  for i, scaling in enumerate(scalings):
    before = len(events)
    results.append(ppl_lib.perplexity(CFG, params, docs, length=24, rope=scaling, batch_size=3).ppl)
    if i:
      assert len(events) == before, "a new factor set recompiled the evaluation"
  assert len(set(results)) == 3  # the factors really changed the result
  before = len(events)
  ppl_lib.perplexity(CFG, params, docs, length=24, rope=scalings[0], batch_size=2)  # new shape: compiles
  assert len(events) > before


def test_vmap_over_stacked_rope(params):
  tokens = jnp.asarray(_docs([16, 16], seed=6)).reshape(2, 16)
  arrays = [CFG.rope_arrays(rope_lib.RopeScaling("linear", factor=f)) for f in (1.0, 2.0, 4.0)]
  stacked = jax.tree.map(jnp.asarray, rope_lib.stack_rope_arrays(arrays))
  nll, count = jax.jit(jax.vmap(lambda r: ppl_lib.window_nll(CFG, params, tokens, r)))(stacked)
  assert nll.shape == count.shape == (3, 2)
  single_fn = ppl_lib.compiled_window_nll(CFG)
  for i, a in enumerate(arrays):
    single = single_fn(params, tokens, jax.tree.map(jnp.asarray, a), jnp.ones((2, 15)))[0]
    np.testing.assert_allclose(nll[i], single, rtol=1e-5)


def test_mesh_matches_single_device(params):
  docs = _docs([33, 40, 35, 50], seed=7)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1})
  single = ppl_lib.perplexity(CFG, params, docs, length=32, rope=DYNAMIC, batch_size=2)
  ring = ppl_lib.perplexity(CFG.replace(attention="ring"), params, docs, length=32, rope=DYNAMIC, batch_size=2,
                             mesh=mesh)
  np.testing.assert_allclose(ring.window_nll, single.window_nll, rtol=2e-5)


def test_bad_inputs(params):
  docs = _docs([30, 10])
  run = lambda **kw: ppl_lib.perplexity(CFG, params, kw.pop("docs", docs), **{"length": 20, **kw})
  with pytest.raises(evaluate.EvalError, match="length 20 exceeds max_length 16"):
    run(max_length=16)
  with pytest.raises(evaluate.EvalError, match=r"document 1 has 10 tokens, fewer than the evaluation length 20"):
    run()
  assert run(short_documents="skip").num_documents == 1
  with pytest.raises(evaluate.EvalError, match=r"0 of 2 documents have >= 40 tokens \(longest: 30\)"):
    run(length=40, short_documents="skip")
  with pytest.raises(evaluate.EvalError, match="unknown protocol 'strided'"):
    run(protocol="strided", short_documents="skip")
  with pytest.raises(evaluate.EvalError, match=r"sliding windows need a stride >= 1 .*, got 0"):
    run(protocol="sliding", stride=0, short_documents="skip")
  with pytest.raises(evaluate.EvalError, match="outside the model's vocabulary"):
    run(docs=[np.full(25, 256, np.int32)])
  with pytest.raises(evaluate.EvalError, match="no documents"):
    run(docs=[])
  with pytest.raises(evaluate.EvalError, match="batch_size must be >= 1"):
    run(batch_size=0)
  with pytest.raises(evaluate.EvalError, match="unknown short_documents policy"):
    run(short_documents="pad")


# ----------------------------------------------------------------------------------------------------------
# The evaluate experiment.


def _experiment_config(tmp_path, **overrides):
  import json
  from configs import evaluate as evaluate_config
  docs = tmp_path / "docs.jsonl"
  rs = np.random.RandomState(8)
  docs.write_text("".join(json.dumps({"id": f"d{i}", "text": "".join(rs.choice(list("abcdefgh "), 70 + 10 * i))})
                          + "\n" for i in range(3)))
  c = evaluate_config.get_config()
  c.tokenizer = "byte"
  c.data = (str(docs),)
  c.lengths = (32, 64)
  c.progress = False
  c.batch_size = 2
  for k, v in overrides.items():
    c[k] = v
  return c


BYTE_CFG = CFG


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory, params):
  from lrjax import weights
  path = tmp_path_factory.mktemp("model") / "hf"
  weights.save_hf(path, BYTE_CFG, jax.tree.map(np.asarray, params))
  return str(path), params


def test_experiment_writes_table_csv_json_plot(tmp_path, byte_model):
  import csv
  import json
  from lrjax import factors
  path, params = byte_model
  factor_file = tmp_path / "f.json"
  long_factor = np.linspace(1, 3, BYTE_CFG.rotary_dim // 2)
  factors.save(factor_file, rope_lib.RopeScaling("longrope", long_factor=long_factor, factor=4.0,
                                                 original_max_position_embeddings=16))
  c = _experiment_config(tmp_path, model=path,
                         settings=("none", "pi", "yarn:2", "dynamic", f"mine={factor_file}"))
  printed = []
  out = evaluate.run(c, str(tmp_path / "work"), print_fn=printed.append)
  assert list(out["table"]) == ["none", "pi", "yarn:2", "dynamic", "mine"]
  rows = list(csv.DictReader(open(out["files"]["csv"])))
  assert [(r["setting"], r["length"]) for r in rows] == [(s, n) for s in out["table"] for n in ("32", "64")]
  cells = json.load(open(out["files"]["json"]))["cells"]
  assert len(cells) == 10 and len(cells[0]["windows"]["nll"]) == 3
  assert open(out["files"]["plot"], "rb").read(4) == b"\x89PNG"
  assert "setting \\ length" in printed[0] and "mine" in printed[0]
  # cells equal direct perplexity calls with the documented scalings (pi: s = 64 / 16 at length 64)
  from lrjax import data, tokenizers
  docs = data.tokenized_documents(c.data[0], tokenizers.ByteTokenizer(), min_tokens=64)
  cfg = BYTE_CFG.replace(block_q=c.block_q, block_k=c.block_k)
  for setting, scaling in (("pi", rope_lib.RopeScaling("linear", factor=4.0)),
                           ("mine", factors.load(factor_file))):
    direct = ppl_lib.perplexity(cfg, params, docs, length=64, rope=scaling, batch_size=2)
    np.testing.assert_allclose(out["table"][setting][64], direct.ppl, rtol=1e-5)


def test_experiment_bad_configs(tmp_path, byte_model):
  path, _ = byte_model
  with pytest.raises(evaluate.EvalError, match="stride is set"):
    evaluate.run(_experiment_config(tmp_path, model=path, stride=8), str(tmp_path))
  with pytest.raises(evaluate.EvalError, match="not a method .* nor an existing factor file"):
    evaluate.run(_experiment_config(tmp_path, model=path, settings=("pii",)), str(tmp_path))
  with pytest.raises(evaluate.EvalError, match="length 64 exceeds max_length 32"):
    evaluate.run(_experiment_config(tmp_path, model=path, max_length=32), str(tmp_path))
  c = _experiment_config(tmp_path, model=path)
  c.unlock()
  c.colour = "red"
  with pytest.raises(evaluate.EvalError, match="unknown config key"):
    evaluate.run(c, str(tmp_path))
  with pytest.raises(evaluate.EvalError, match="no tokenizer.json or tokenizer.model"):
    evaluate.run(_experiment_config(tmp_path, model=path, tokenizer="auto"), str(tmp_path))


def test_experiment_cli_prints_one_line_error(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "experiments/evaluate.py", "--config=configs/evaluate.py",
                         f"--config.model={tmp_path}/nope", f"--workdir={tmp_path}/w"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == f"error: model '{tmp_path}/nope': {tmp_path}/nope does not exist"


@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
def test_flash_forward_cpu_and_accelerator_layouts_agree(heads):
  """attention.flash_forward's per-head loop (the CPU default) and its batched layout (accelerators) both
  equal the materialised reference: the evaluation's forward uses one or the other by backend."""
  from lrjax import attention
  rs = np.random.RandomState(9)
  q = rs.randn(2, 40, heads[0], 8).astype(np.float32)
  k, v = (rs.randn(2, 40, heads[1], 8).astype(np.float32) for _ in range(2))
  pos = np.stack([np.arange(40), rs.permutation(40)]).astype(np.int32)  # row 1: a permuted order
  ref = attention.reference_attention(q, k, v, pos, pos)
  for head_loop in (True, False):
    out, lse = jax.jit(lambda q, k, v: attention.flash_forward(q, k, v, pos, pos, block_q=16, block_k=8,
                                                               head_loop=head_loop))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    assert lse.shape == (2, 40, heads[0])


@pytest.mark.parametrize("variant", ["", "proofpile", "pg19", "books3"])
def test_protocol_configs_validate(variant):
  """Every perplexity protocol config (the paper's Proof-pile, PG19 and Books3 settings) is well formed."""
  from configs import evaluate as evaluate_config
  c = evaluate_config.get_config(variant)
  evaluate.validate_config(c)
  if variant == "books3":
    assert c.protocol == "sliding" and c.stride == 262144 and max(c.lengths) == 2097152
