"""Mesh creation, sharding rules and a sharded forward against the single-device one (8 simulated devices)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lrjax import model as M
from lrjax import sharding as S

CFG = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, block_q=8, block_k=8)


def _mesh(**sizes):
  return S.make_mesh(ml_collections.ConfigDict(sizes))


def test_make_mesh_sizes_and_rest():
  mesh = _mesh(data=2, fsdp=-1, sequence=1, tensor=2)
  assert mesh.axis_names == S.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  sub = S.make_mesh({"sequence": 4}, devices=jax.devices()[:4])
  assert dict(sub.shape) == {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 1}


@pytest.mark.parametrize("sizes, match", [
    (dict(data=3, fsdp=1, sequence=1, tensor=1), "3 devices but 8 are available"),
    (dict(data=3, fsdp=-1), "do not divide|does not divide"),
    (dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
    (dict(data=0, fsdp=-1), "positive or -1"),
    (dict(batch=2), "unknown mesh axes"),
])
def test_make_mesh_errors(sizes, match):
  with pytest.raises(S.ShardingError, match=match):
    S.make_mesh(ml_collections.ConfigDict(sizes))


@pytest.fixture(scope="module")
def params():
  return M.init_params(CFG, jax.random.PRNGKey(0))


def test_param_shardings_follow_rules(params):
  mesh = _mesh(data=1, fsdp=2, sequence=2, tensor=2)
  shardings = S.param_shardings(mesh, params)
  w = ("fsdp", "sequence")  # weights' embed dim: ZeRO-style over fsdp and the sequence group
  expected = {  # written out by hand from the rules in the docs, not derived from the code
      "embed": P("tensor", w), "lm_head": P(w, "tensor"), "final_norm": P(None),
      "layers/attn_norm": P(None, None), "layers/mlp_norm": P(None, None),
      "layers/q": P(None, w, "tensor", None), "layers/k": P(None, w, "tensor", None),
      "layers/v": P(None, w, "tensor", None), "layers/o": P(None, "tensor", None, w),
      "layers/gate": P(None, w, "tensor"), "layers/up": P(None, w, "tensor"), "layers/down": P(None, "tensor", w),
  }
  flat = {S.path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  assert set(flat) == set(expected)
  for name, sharding in flat.items():
    shape = M.PARAM_AXES[name]
    assert sharding.is_equivalent_to(NamedSharding(mesh, expected[name]), len(shape)), name


def test_param_shardings_errors(params):
  mesh = _mesh(fsdp=8)
  with pytest.raises(S.ShardingError, match=r"parameters without logical axes.*extra"):
    S.param_shardings(mesh, {**params, "extra": jnp.zeros(3)})
  bad = jax.eval_shape(lambda: M.init_params(CFG.replace(hidden_size=36), jax.random.PRNGKey(0)))
  with pytest.raises(S.ShardingError, match=r"layers/q dim 1 \(embed\) has size 36, not divisible"):
    S.param_shardings(mesh, bad)
  with pytest.raises(S.ShardingError, match=r"layers/q has shape \(2, 32, 4\) but logical axes"):
    S.param_shardings(mesh, {**params, "layers": {**params["layers"], "q": jnp.zeros((2, 32, 4))}})


def test_validate_names_each_problem():
  mesh = _mesh(data=2, fsdp=1, sequence=2, tensor=2)
  S.validate(mesh, batch=2, length=8, config=CFG.replace(attention="ring"), order="zigzag")
  with pytest.raises(S.ShardingError) as e:
    S.validate(mesh, batch=3, length=6, config=CFG.replace(num_heads=3, num_kv_heads=3), order="zigzag")
  msg = str(e.value)
  for part in ("batch 3 is not divisible by data*fsdp = 2", "length 6 is not divisible by 2*sequence = 4",
               "query heads 3 is not divisible by tensor = 2", "key/value heads 3"):
    assert part in msg
  with pytest.raises(S.ShardingError, match="length 7 is not divisible by sequence = 2"):
    S.validate(mesh, batch=2, length=7, config=CFG)


def test_sharded_forward_equals_single_device(params):
  b, t = 4, 16
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, CFG.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  rope = jax.tree.map(jnp.asarray, CFG.rope_arrays())
  fwd = lambda p, x, pos, r: M.forward(CFG, p, x, pos, r)
  expected = jax.jit(fwd)(params, tokens, positions, rope)

  mesh = _mesh(data=2, fsdp=2, sequence=1, tensor=2)
  S.validate(mesh, batch=b, length=t, config=CFG)
  p_sh = S.param_shardings(mesh, params)
  sharded_params = jax.device_put(params, p_sh)
  x = jax.device_put(tokens, S.batch_sharding(mesh))
  pos = jax.device_put(positions, S.batch_sharding(mesh))
  with S.mesh_context(mesh):
    out = jax.jit(fwd)(sharded_params, x, pos, rope)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
  # The activation constraint ("batch", "length", "embed") took effect on the output.
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "sequence", None)), 3)
  assert sharded_params["layers"]["q"].addressable_shards[0].data.shape == (2, 16, 2, 8)
