"""Names shared by the model, sharding and ring attention: mesh axes, logical axes, and their rules.

One mesh with four named axes, always in this order (size-1 axes cost nothing):

  data      pure data parallelism (params replicated)
  fsdp      data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style)
  sequence  sequence (context) parallelism: ring attention rotates K/V around this axis
  tensor    tensor (head / MLP / vocab) parallelism

Parameters carry logical axes (PARAM_AXES), activations are constrained with logical names in the model,
and LOGICAL_RULES maps logical names to mesh axes. Weights' `embed` dimension is sharded over
(fsdp, sequence), as in LWM and MaxText, so devices of one sequence group do not each hold a full copy of the
weights. Activations resolve `batch` first, so their `embed` dimension finds fsdp and sequence already taken
and stays unsharded (flax's priority rule).

This module imports nothing from lrjax: every other module may import it.
"""

from __future__ import annotations

from typing import Any

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"
TENSOR_AXIS = "tensor"

# Causal load-balancing orders of a sequence split over the ring (lrjax.ring.permutation).
LOAD_BALANCE_ORDERS = ("none", "zigzag", "striped")

# (logical name, mesh axes), in priority order; see the module docstring.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", SEQUENCE_AXIS),
    ("vocab", TENSOR_AXIS),
    ("q_heads", TENSOR_AXIS),
    ("kv_heads", TENSOR_AXIS),
    ("mlp", TENSOR_AXIS),
    ("embed", ("fsdp", SEQUENCE_AXIS)),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
)

# Logical axes of every parameter of lrjax.model (paths as "a/b" in the params pytree).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
    "layers/attn_norm": ("layers", "norm"),
    "layers/mlp_norm": ("layers", "norm"),
    "layers/q": ("layers", "embed", "q_heads", "head_dim"),
    "layers/k": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/v": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/q_bias": ("layers", "q_heads", "head_dim"),
    "layers/k_bias": ("layers", "kv_heads", "head_dim"),
    "layers/v_bias": ("layers", "kv_heads", "head_dim"),
    "layers/o": ("layers", "q_heads", "head_dim", "embed"),
    "layers/gate": ("layers", "embed", "mlp"),
    "layers/up": ("layers", "embed", "mlp"),
    "layers/down": ("layers", "mlp", "embed"),
}
