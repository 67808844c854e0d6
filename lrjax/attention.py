"""Attention dispatch: one entry point, every implementation, resolved per backend at trace time.

Shapes (Gemma-style letters): b batch, t query length, s key length, n query heads, k key/value heads,
g = n // k query heads per key/value head, h head dim. q is [b, t, n, h]; k, v are [b, s, k, h]; positions
i32[b|1, t] / [b|1, s] (global positions: causality and windows compare them, never indices); segment ids
i32[b|1, t] / [b|1, s] or None. Masks: lrjax.kernels.mask.

Implementations (`implementation=`):
  reference    materialised softmax (the oracle; O(t s) memory)
  blockwise    pure-JAX flash attention, any backend (lrjax.kernels.blockwise)
  xla, cudnn   jax.nn.dot_product_attention (lrjax.kernels.dot_product)
  splash       TPU splash attention (lrjax.kernels.splash)
  pallas_gpu   Pallas-Triton flash attention by position (lrjax.kernels.pallas_gpu)
  ring:<step>  ring attention over the mesh's sequence axis, each ring step run by <step> in (blockwise,
               splash, pallas_gpu, auto); "ring" = "ring:auto"
  auto         per backend (resolve): TPU splash, GPU cudnn, CPU blockwise; ring:auto: TPU splash, GPU
               pallas_gpu, CPU blockwise
On the CPU the Pallas kernels run in interpret mode (tests). Index-masking kernels (xla, cudnn) are used only
where masking by index equals masking by position (lrjax.kernels.mask.index_aligned, checked at run time;
otherwise the blockwise kernel runs); splash checks the same per sub-block. A call a kernel cannot express
statically (shapes, dtypes, a KV cache, segment ids for cuDNN) runs the blockwise kernel instead, with one
warning per distinct reason on the logger "lrjax.attention". Never silently wrong.

Under a mesh (jax.set_mesh) the Pallas kernels run per device in a shard_map over the batch and tensor axes
(the sequence is gathered: all-gather context parallelism); the ring shard_maps over the sequence axis.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from lrjax import axes
from lrjax import ring as ring_lib
from lrjax.kernels import dot_product
from lrjax.kernels import mask as mask_lib
from lrjax.kernels import pallas_gpu
from lrjax.kernels import splash
from lrjax.kernels import step as step_lib
from lrjax.kernels.blockwise import Blockwise, blockwise_attention, flash_backward, flash_forward
from lrjax.kernels.reference import reference_attention

__all__ = ["IMPLEMENTATIONS", "AttentionError", "attention", "blockwise_attention", "flash_backward",
           "flash_forward", "reference_attention", "resolve"]

RING_STEPS = ("auto", "blockwise", "splash", "pallas_gpu")
IMPLEMENTATIONS = (("auto", "reference", "blockwise", "xla", "cudnn", "splash", "pallas_gpu", "ring")
                   + tuple(f"ring:{step}" for step in RING_STEPS))
_AUTO = {"tpu": "splash", "gpu": "cudnn"}
_AUTO_RING_STEP = {"tpu": "splash", "gpu": "pallas_gpu"}

logger = logging.getLogger("lrjax.attention")


class AttentionError(ValueError):
  """An unknown implementation or inconsistent attention arguments; the message names the problem."""


def resolve(implementation: str, backend: str | None = None) -> str:
  """The concrete implementation `implementation` means on `backend` ("cpu", "gpu", "tpu"; None: default).

  "auto" and "ring"/"ring:auto" resolve per backend (module doc); explicit names resolve to themselves.
  Raises:
    AttentionError for an unknown name.
  """
  if implementation not in IMPLEMENTATIONS:
    raise AttentionError(f"unknown attention implementation {implementation!r}; expected one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
  backend = jax.default_backend() if backend is None else backend
  if implementation == "auto":
    return _AUTO.get(backend, "blockwise")
  if implementation in ("ring", "ring:auto"):
    return "ring:" + _AUTO_RING_STEP.get(backend, "blockwise")
  return implementation


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logger.warning(message)


def _fall_back(name: str, reason: str) -> None:
  _warn_once(f"{name} attention cannot run this call ({reason}); using the blockwise kernel")


def _mesh_split(mesh, q, k):
  """(batch axes, head axis) a per-device kernel can shard over: axes present, not manual, dividing the shapes."""
  if mesh.empty or mesh.manual_axes:
    return None
  names = mesh.axis_names
  batch = tuple(a for a in axes.BATCH_AXES if a in names)
  if not batch or q.shape[0] % math.prod(mesh.shape[a] for a in batch):
    batch = ()
  head = axes.TENSOR_AXIS if axes.TENSOR_AXIS in names else None
  if head and (q.shape[2] % mesh.shape[head] or k.shape[2] % mesh.shape[head]):
    head = None
  return batch, head


def _local_shapes(split, mesh, q, k):
  """Per-device shapes of q, k under _mesh_split (the kernels check what they will see)."""
  if split is None:
    return q, k
  batch, head = split
  nb, nh = math.prod(mesh.shape[a] for a in batch), mesh.shape[head] if head else 1
  local = lambda x: jax.ShapeDtypeStruct((x.shape[0] // nb, x.shape[1], x.shape[2] // nh, x.shape[3]), x.dtype)
  return local(q), local(k)


def _per_device(fn, split, mesh, q, k, v, q_pos, k_pos, q_seg, k_seg):
  """fn on each device's batch rows and heads (a shard_map), or directly without a mesh / inside shard_map."""
  if split is None:
    return fn(q, k, v, q_pos, k_pos, q_seg, k_seg)
  batch, head = split
  x = P(batch or None, None, head, None)
  rows = lambda a: None if a is None else P((batch or None) if a.shape[0] > 1 else None, None)
  specs = (x, x, x, rows(q_pos), rows(k_pos), rows(q_seg), rows(k_seg))
  # check_vma=False: the kernels start their loops from unannotated zeros (see lrjax.ring).
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=x, check_vma=False)(
      q, k, v, q_pos, k_pos, q_seg, k_seg)


def _step(name: str, *, causal, sliding_window, block_q, block_k, scale, parts=1):
  if name == "splash":
    return splash.Splash(causal, sliding_window, block_q, block_k, scale, parts=parts)
  if name == "pallas_gpu":
    return pallas_gpu.PallasGpu(causal, sliding_window, block_q, block_k, scale)
  return Blockwise(causal, sliding_window, block_q, block_k, scale)


def _ring_kernel(name: str, q, k, mesh, axis_name, **rules):
  """The ring step kernel for "ring:<step>", checked against the local shapes (zig-zag wants 2 sub-blocks)."""
  step_name = name.split(":", 1)[1]
  if step_name == "blockwise" or axis_name not in mesh.axis_names:
    return _step("blockwise", **rules)
  ring = mesh.shape[axis_name]
  tp = mesh.shape[axes.TENSOR_AXIS] if axes.TENSOR_AXIS in mesh.axis_names else 1
  local = lambda x: jax.ShapeDtypeStruct((1, x.shape[1] // ring, max(x.shape[2] // tp, 1), x.shape[3]), x.dtype)
  ql, kl = local(q), local(k)
  for parts in ((2, 1) if step_name == "splash" else (1,)):
    kernel = _step(step_name, parts=parts, **rules)
    reason = kernel.unsupported(ql, kl)
    if reason is None:
      return kernel
  _fall_back(f"ring step {step_name}", reason)
  return _step("blockwise", **rules)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
              implementation: str = "blockwise", causal: bool = True, block_q: int = 512, block_k: int = 512,
              q_segment: jax.Array | None = None, k_segment: jax.Array | None = None,
              sliding_window: int | None = None, scale: float | None = None,
              axis_name: str = axes.SEQUENCE_AXIS) -> jax.Array:
  """Attention by a static implementation name (from config); see the module doc.

  Args:
    q [b,t,n,h]; k, v [b,s,k,h]; q_pos i32[b|1,t]; k_pos i32[b|1,s] (ring: [b, t], [b, s]).
    implementation: one of IMPLEMENTATIONS, resolved by `resolve` for the default backend.
    causal, sliding_window, q_segment, k_segment: the mask (lrjax.kernels.mask).
    block_q, block_k: tiles (tokens) of the blockwise and splash kernels (pallas_gpu caps them, see there).
    scale: logit scale (default h ** -0.5).
    axis_name: the mesh axis ring attention rotates over.
  Returns:
    [b, t, n, h] in q.dtype, differentiable in q, k, v.
  Raises:
    AttentionError for an unknown implementation; lrjax.kernels.mask.MaskError for bad mask arguments;
    lrjax.ring.RingError when the ring cannot shard these shapes over the mesh.
  """
  name = resolve(implementation)
  mask_lib.check(q_pos, k_pos, q_segment, k_segment, causal=causal, sliding_window=sliding_window)
  rules = dict(causal=causal, sliding_window=sliding_window, block_q=block_q, block_k=block_k, scale=scale)
  segments = dict(q_segment=q_segment, k_segment=k_segment)
  if name == "reference":
    return reference_attention(q, k, v, q_pos, k_pos, causal=causal, scale=scale, sliding_window=sliding_window,
                               **segments)
  if name.startswith("ring:"):
    mesh = ring_lib.context_mesh(None)
    kernel = _ring_kernel(name, q, k, mesh, axis_name, **rules)
    return ring_lib.ring_attention_sharded(q, k, v, q_pos, k_pos, axis_name=axis_name, mesh=mesh, kernel=kernel,
                                           **rules, **segments)
  blockwise = lambda: blockwise_attention(q, k, v, q_pos, k_pos, causal, block_q, block_k, scale,
                                          sliding_window=sliding_window, **segments)
  if name == "blockwise":
    return blockwise()
  if name in ("xla", "cudnn"):
    reason = dot_product.unsupported(name, q, k, causal=causal, segments=q_segment is not None)
    if reason:
      _fall_back(name, reason)
      return blockwise()
    fast = lambda q, k, v: dot_product.attention(q, k, v, implementation=name, causal=causal, scale=scale,
                                                 sliding_window=sliding_window, **segments)
    if not causal:  # no position rule: index and position masks agree
      return fast(q, k, v)
    slow = lambda q, k, v: blockwise_attention(q, k, v, q_pos, k_pos, causal, block_q, block_k, scale,
                                               sliding_window=sliding_window, **segments)
    return lax.cond(mask_lib.index_aligned(q_pos, k_pos, q_segment, k_segment), fast, slow, q, k, v)
  mesh = jax.sharding.get_abstract_mesh()
  split = _mesh_split(mesh, q, k)
  kernel = _step(name, **rules)
  reason = kernel.unsupported(*_local_shapes(split, mesh, q, k))
  if reason:
    _fall_back(name, reason)
    return blockwise()
  return _per_device(functools.partial(step_lib.fused, kernel), split, mesh, q, k, v, q_pos, k_pos, q_segment,
                     k_segment)
