"""NVIDIA GPU: attention through cuDNN's fused kernel (FlashAttention-style).

Everything but attention is the reference. cuDNN's kernel takes bfloat16 or
float16 and at most 128 channels per head; other inputs take the reference
path, so float32 models keep float32 attention. A shape or platform that
jax.nn.dot_product_attention refuses for cuDNN (it raises while tracing)
takes the reference path too, with a warning naming the shapes.

With a mask, jax's cuDNN path refuses to train on an odd sequence length
(the mask becomes an additive bias, which cuDNN's backward takes for even
lengths only), and the U-Nets' contexts are odd: text plus the null token,
IF's image tokens plus 77 text tokens. Such sequences are padded to even
length first, exactly: a padded query row is dropped, and a padded key is
masked and carries the mean of the values, so a fully masked row still
averages the real values uniformly (its gradients included).
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
    out = padded_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                           implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError) as e:
    logging.warning("cuDNN attention refused q %s, k %s (%s): using the "
                    "reference attention.", q.shape, k.shape,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    return reference.attention(q, k, v, mask)
  return out.astype(v.dtype)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     mask: Optional[jax.Array], *,
                     implementation: Optional[str]) -> jax.Array:
  """``jax.nn.dot_product_attention`` with masked sequences of even length.

  Args:
    q: ``[B, T, N, H]`` queries.
    k: ``[B, S, N, H]`` keys (dtype of q).
    v: ``[B, S, N, H]`` values (dtype of q).
    mask: ``[B, S]`` bool (True = attend) or None (nothing is padded).
    implementation: passed to ``jax.nn.dot_product_attention``.

  Returns:
    ``[B, T, N, H]``, the attention of the unpadded inputs.
  """
  t, s = q.shape[1], k.shape[1]
  if mask is not None and t % 2:
    q = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
  if mask is not None and s % 2:
    k = jnp.concatenate([k, jnp.zeros_like(k[:, :1])], axis=1)
    mean_v = v.astype(jnp.float32).mean(axis=1, keepdims=True).astype(v.dtype)
    v = jnp.concatenate([v, mean_v], axis=1)
    mask = jnp.concatenate([mask, jnp.zeros_like(mask[:, :1])], axis=1)
  out = jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else mask[:, None, None, :],
      implementation=implementation)
  return out[:, :t]
