"""XLA:CPU: the reference functions rewritten for the CPU compiler.

Same functions as ``reference`` (tests/test_kernels.py checks values and
gradients), written around what XLA:CPU does slowly: reductions that keep
only the channel axis (``channel_sum``), autodiff's extra passes over
GroupNorm and attention (hand-written VJPs in ``group_norm`` and
``attention_core``), and cheap producers re-run inside every consumer
(coefficients that end in a divide). The measurements behind each rewrite
are in benchmarks/RESULTS.md. Nothing here has been measured on GPU or TPU.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from imagen_jax.kernels import channel_sum
from imagen_jax.kernels import group_norm as group_norm_lib
from imagen_jax.kernels import reference
from imagen_jax.kernels.attention_core import attend

modulate = channel_sum.modulate


def bias_add(y: jax.Array, bias: jax.Array,
             activation: Optional[str] = None) -> jax.Array:
  """``reference.bias_add`` with channel-sum bias gradients (same args)."""
  if activation is None:
    return channel_sum.add_bias(y, bias)
  if activation == "gelu":
    return channel_sum.bias_gelu(y, bias)
  return reference.activate(channel_sum.add_bias(y, bias), activation)


def group_norm_act(x: jax.Array, scale: jax.Array, shift: jax.Array, *,
                   num_groups: int, epsilon: float = 1e-5,
                   activation: Optional[str] = None, dtype: Any = None
                   ) -> jax.Array:
  """``reference.group_norm_act`` with a closed-form VJP (same args)."""
  return group_norm_lib.group_norm_act(x, scale, shift, num_groups=num_groups,
                                       epsilon=epsilon, activation=activation,
                                       dtype=dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array]) -> jax.Array:
  """``reference.attention`` with a hand-written VJP (same args)."""
  return attend(q, k.astype(q.dtype), v.astype(q.dtype), mask).astype(v.dtype)
