"""NVIDIA GPU: attention through cuDNN's fused kernel (FlashAttention-style).

Everything but attention is the reference. cuDNN's kernel takes bfloat16 or
float16 and at most 128 channels per head; other inputs take the reference
path, so float32 models keep float32 attention. A shape or platform that
jax.nn.dot_product_attention refuses for cuDNN (it raises while tracing)
takes the reference path too, with a warning naming the shapes.
"""

from __future__ import annotations

import logging
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
  try:
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype),
        mask=None if mask is None else mask[:, None, None, :],
        implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError) as e:
    logging.warning("cuDNN attention refused q %s, k %s (%s): using the "
                    "reference attention.", q.shape, k.shape,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    return reference.attention(q, k, v, mask)
  return out.astype(v.dtype)
