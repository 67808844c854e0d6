"""Greedy decoding with a KV cache, one RoPE factor set per sequence.

Keys in the cache are rotated once, when they are written; a cache built with one factor set and read with
another silently breaks retrieval (the bug several engines shipped for Phi-3's short/long switch). So the
factor set is bound to a sequence, never to a step:

* "total_length" (default): the set is chosen from the final length (prompt + new tokens) before prefill.
* "reprefill" (transformers' behaviour): the set follows the current length; the moment the sequence crosses
  a switch point (e.g. original_max_position_embeddings) the whole sequence is prefilled again with the new
  set, so the cache is never mixed.

Shapes: cache k/v [L, b, S, K, H], cache positions i32[L, b, S] (empty slots hold a huge sentinel position,
which causal masking by position excludes).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import model as model_lib
from lrjax import rope as rope_lib

EMPTY_POSITION = np.iinfo(np.int32).max
POLICIES = ("total_length", "reprefill")


def init_cache(config: model_lib.ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty cache for `max_len` tokens: k/v zeros [L, b, S, K, H], positions = EMPTY_POSITION."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full(shape[:3], EMPTY_POSITION, jnp.int32)}


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def _step(config, params, tokens, positions, rope, cache, cache_index):
  """Writes tokens [b, t] at cache_index; returns logits f32[b, V] of the last token and the cache."""
  hidden, cache = model_lib.Llama(config).apply({"params": params}, tokens, positions, rope, cache,
                                                cache_index)
  head = model_lib.head_weights(config, params).astype(hidden.dtype)
  logits = jnp.einsum("bd,dv->bv", hidden[:, -1], head, preferred_element_type=jnp.float32)
  return logits, cache


def _prefill(config, params, tokens: np.ndarray, rope, new_tokens: int, pad_multiple: int):
  """Prefills a [b, t] sequence left-padded to a multiple of pad_multiple (padding slots are masked out).

  Returns (logits f32[b, V] of the last token, cache with room for `new_tokens` more, next free slot).
  """
  b, t = tokens.shape
  pad_to = -(-t // pad_multiple) * pad_multiple
  pad = pad_to - t
  padded = np.concatenate([np.zeros((b, pad), np.int32), tokens.astype(np.int32)], axis=1)
  positions = np.concatenate([np.full((b, pad), EMPTY_POSITION, np.int32),
                              np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))], axis=1)
  cache = init_cache(config, b, pad_to + new_tokens)
  logits, cache = _step(config, params, jnp.asarray(padded), jnp.asarray(positions), rope, cache,
                        jnp.int32(0))
  return logits, cache, pad_to


def greedy_generate(config: model_lib.ModelConfig, params: dict, prompt: np.ndarray, max_new_tokens: int,
                    *, scaling: rope_lib.RopeScaling | None = None, policy: str = "total_length",
                    pad_multiple: int = 256, stop: Callable[[np.ndarray], bool] | None = None) -> np.ndarray:
  """Greedy continuation of `prompt` i32[b, t] (all rows the same length): returns i32[b, n <= max_new_tokens].

  Args:
    scaling: RoPE setting (default: the checkpoint's own); its factor set is chosen per sequence (policy).
    policy: "total_length" or "reprefill" (see module docstring).
    pad_multiple: prompts are left-padded to a multiple of this, so nearby lengths share one compiled
      prefill.
    stop: optional predicate on the tokens generated so far ([b, n]) to end early.
  """
  if policy not in POLICIES:
    raise ValueError(f"unknown decoding policy {policy!r}; expected one of {', '.join(POLICIES)}")
  sequence = np.asarray(prompt, np.int32)
  b, t = sequence.shape
  host_rope = config.rope_arrays(scaling, seq_len=t + max_new_tokens if policy == "total_length" else t)
  logits, cache, slot = _prefill(config, params, sequence, _device(host_rope), max_new_tokens, pad_multiple)
  out = np.zeros((b, max_new_tokens), np.int32)
  for i in range(max_new_tokens):
    out[:, i] = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    if i + 1 == max_new_tokens or (stop is not None and stop(out[:, :i + 1])):
      return out[:, :i + 1]
    sequence = np.concatenate([sequence, out[:, i:i + 1]], axis=1)
    n = sequence.shape[1]  # the new token sits at position n - 1
    if policy == "reprefill":
      new_rope = config.rope_arrays(scaling, seq_len=n)
      if not _same_rope(new_rope, host_rope):
        # The factor set changed: rebuild the whole cache with the new set rather than mix two.
        host_rope = new_rope
        logits, cache, slot = _prefill(config, params, sequence, _device(host_rope),
                                       max_new_tokens - i - 1, pad_multiple)
        continue
    logits, cache = _step(config, params, jnp.asarray(out[:, i:i + 1]), jnp.full((b, 1), n - 1, jnp.int32),
                          _device(host_rope), cache, jnp.int32(slot))
    slot += 1
  return out


def _device(rope: rope_lib.RopeArrays) -> rope_lib.RopeArrays:
  return jax.tree.map(jnp.asarray, rope)


def _same_rope(a: rope_lib.RopeArrays, b: rope_lib.RopeArrays) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
