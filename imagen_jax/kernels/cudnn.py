"""NVIDIA GPU: attention through cuDNN's fused kernel (FlashAttention-style).

Everything but attention is the reference. cuDNN's kernel takes bfloat16 or
float16 and at most 128 channels per head (jax.nn.dot_product_attention
raises otherwise); other inputs take the reference path, so float32 models
keep float32 attention.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from imagen_jax.kernels import reference

bias_add = reference.bias_add
modulate = reference.modulate
group_norm_act = reference.group_norm_act

_DTYPES = (jnp.bfloat16, jnp.float16)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array]) -> jax.Array:
  """``reference.attention`` computed by cuDNN where it can (same args)."""
  if q.dtype not in _DTYPES or q.shape[-1] > 128:
    return reference.attention(q, k, v, mask)
  return jax.nn.dot_product_attention(
      q, k.astype(q.dtype), v.astype(q.dtype),
      mask=None if mask is None else mask[:, None, None, :],
      implementation="cudnn").astype(v.dtype)
