"""The plain implementations: textbook jnp, gradients by autodiff.

These define what every other implementation must compute, and they are
what accelerators run until a measurement on that backend says otherwise
(XLA on GPU and TPU fuses them well).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu", "gelu")
# What jax.nn.dot_product_attention puts at masked logits.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def activate(u: jax.Array, activation: Optional[str]) -> jax.Array:
  """Applies ``activation`` (None, "silu" or tanh-approximate "gelu")."""
  if activation is None:
    return u
  if activation == "silu":
    return jax.nn.silu(u)
  if activation == "gelu":
    return jax.nn.gelu(u, approximate=True)
  raise ValueError(f"activation={activation!r}; use one of {ACTIVATIONS}.")


def bias_add(y: jax.Array, bias: jax.Array,
             activation: Optional[str] = None) -> jax.Array:
  """``act(y + bias)`` over the last axis.

  Args:
    y: ``[..., C]`` activations (a matmul's or conv's output).
    bias: ``[C]``, cast to the dtype of ``y``.
    activation: None, "silu" or "gelu" (tanh approximation).

  Returns:
    ``[..., C]`` in the dtype of ``y``.
  """
  return activate(y + bias.astype(y.dtype), activation)


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """FiLM: ``x * (1 + scale) + shift``.

  Args:
    x: ``[B, H, W, C]`` features.
    scale: ``[B, C]``.
    shift: ``[B, C]``.

  Returns:
    ``[B, H, W, C]`` in the dtype of ``x``.
  """
  scale = scale.astype(x.dtype)[:, None, None, :]
  shift = shift.astype(x.dtype)[:, None, None, :]
  return x * (1 + scale) + shift


def check_group_norm(x: jax.Array, num_groups: int,
                     activation: Optional[str]) -> None:
  """Raises one clear line for a channel count or activation it cannot take."""
  if activation not in (None, "silu"):
    raise ValueError(f"group_norm_act: activation={activation!r}; use None or "
                     "'silu'.")
  c = x.shape[-1]
  if c % num_groups:
    raise ValueError(f"GroupNorm: {c} channels are not divisible into "
                     f"{num_groups} groups; set num_groups to a divisor of {c}.")


def group_norm_act(x: jax.Array, scale: jax.Array, shift: jax.Array, *,
                   num_groups: int, epsilon: float = 1e-5,
                   activation: Optional[str] = None, dtype: Any = None
                   ) -> jax.Array:
  """``act(GroupNorm(x) * scale + shift)`` with float32 statistics.

  ``scale`` / ``shift`` fold the norm's own parameters together with any
  FiLM conditioning (``gamma * (1 + s)``, ``beta * (1 + s) + t``). The
  variance is taken around the mean (two passes), accurate when the mean is
  large against the spread.

  Args:
    x: ``[B, H, W, C]`` features (any float dtype).
    scale: ``[C]`` or ``[B, C]`` multiplier of the normalised features.
    shift: ``[C]`` or ``[B, C]`` offset added after the scale.
    num_groups: number of channel groups; must divide C.
    epsilon: added to the variance.
    activation: None or "silu".
    dtype: output dtype (default: that of ``x``).

  Returns:
    ``[B, H, W, C]`` in ``dtype``.
  """
  check_group_norm(x, num_groups, activation)
  b, h, w, c = x.shape
  xf = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  mean = xf.mean(axis=(1, 2, 4), keepdims=True)          # [B, 1, 1, G, 1]
  var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
  xhat = ((xf - mean) * jax.lax.rsqrt(var + epsilon)).reshape(b, h, w, c)
  scale = jnp.broadcast_to(scale.astype(jnp.float32), (b, c))
  shift = jnp.broadcast_to(shift.astype(jnp.float32), (b, c))
  u = xhat * scale[:, None, None, :] + shift[:, None, None, :]
  return activate(u, activation).astype(dtype or x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array]) -> jax.Array:
  """Multi-head ``softmax(q k^T / sqrt(H), masked) v``, float32 softmax.

  A fully masked row attends uniformly to every position (its output does
  not depend on q or k); callers that need a defined output add a token
  that is never masked.

  Args:
    q: ``[B, T, N, H]`` queries.
    k: ``[B, S, N, H]`` keys.
    v: ``[B, S, N, H]`` values.
    mask: ``[B, S]`` bool (True = attend) or None.

  Returns:
    ``[B, T, N, H]`` in the dtype of ``v``.
  """
  k, v_in = k.astype(q.dtype), v.astype(q.dtype)
  if min(q.shape[1], k.shape[1]) > 1:
    return jax.nn.dot_product_attention(
        q, k, v_in, mask=None if mask is None else mask[:, None, None, :],
        implementation="xla").astype(v.dtype)
  # A one-position sequence (attention pooling's single query, a one-token
  # context): dot_product_attention's grouped layout then leaves size-1
  # contracting dimensions whose bfloat16 backward XLA:CPU cannot compile
  # ("Dot with multiple contracting dimensions"). The same computation,
  # written out: float32 logits and softmax, masked logits at the same
  # large negative value (a fully masked row stays uniform).
  logits = jnp.einsum("btnh,bsnh->bnts", q, k,
                      preferred_element_type=jnp.float32)  # [B, N, T, S]
  logits = logits * (q.shape[-1] ** -0.5)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v_in).astype(v.dtype)
