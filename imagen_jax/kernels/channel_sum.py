"""Sums over every axis but the channels, in a form XLA:CPU runs fast.

Reductions that keep only the narrow channel axis of an activation (bias
gradients, GroupNorm statistics and their gradients) are, as written, one
reduce over (B, H, W) with a [C] (or [B, C]) result. XLA:CPU runs those at
a small fraction of memory bandwidth: each output walks a stride-C column, with the elementwise producer
re-run inside the loop. Summing a wide view first, ``[M / R, R * C]`` over its rows (a
vectorised accumulation of whole rows), then the ``[R, C]`` remainder, is
several times faster (benchmarks/RESULTS.md): the same numbers, summed in another
order, in float32.

``add_bias`` is ``y + bias`` with ``channel_sum`` as the bias gradient: the
autodiff gradient of a broadcast add is the slow reduce. ``bias_gelu`` (the
feed-forward's ``gelu(x @ W + b)``) and ``modulate`` (FiLM's
``x * (1 + scale) + shift``) do the same for their bias / scale / shift
gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from imagen_jax.kernels import reference

# Rows folded into one wide row before the column sum; measured on XLA:CPU
# (jaxlib 0.10) at the U-Net's shapes: 128 for whole-tensor sums, 64 when the
# batch axis is kept. Narrower views stay slow, wider ones gain nothing.
_ROWS_ALL = 128
_ROWS_PER_EXAMPLE = 64


def _sum_middle(x: jax.Array, rows: int) -> jax.Array:
  """``x [P, M, C]`` -> ``[P, C]`` float32, summing M in two stages."""
  p, m, c = x.shape
  if m % rows or m <= rows:
    return x.sum(1, dtype=jnp.float32)
  wide = x.reshape(p, m // rows, rows * c).sum(1, dtype=jnp.float32)
  return wide.reshape(p, rows, c).sum(1)                 # [P, C]


def channel_sum(x: jax.Array) -> jax.Array:
  """Sums ``x [..., C]`` over every axis but the last.

  Args:
    x: an array of rank >= 1.

  Returns:
    ``[C]`` float32 sums.
  """
  c = x.shape[-1]
  return _sum_middle(x.reshape(1, -1, c), _ROWS_ALL)[0]


def channel_sum_per_example(x: jax.Array) -> jax.Array:
  """Sums ``x [B, N, C]`` over N.

  Args:
    x: ``[B, N, C]``.

  Returns:
    ``[B, C]`` float32 sums.
  """
  return _sum_middle(x, _ROWS_PER_EXAMPLE)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """``y + bias`` over the last axis, with ``channel_sum`` as bias gradient.

  Args:
    y: ``[..., C]`` activations.
    bias: ``[C]``, cast to the dtype of ``y``.

  Returns:
    ``y + bias`` in the dtype of ``y``.
  """
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  # Only the bias dtype is needed later: a 0-size array keeps nothing alive.
  return add_bias(y, bias), jnp.zeros((0,), bias.dtype)


def _add_bias_bwd(res, dy):
  return dy, channel_sum(dy).astype(res.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)

# tanh-approximate GELU (flax's nn.gelu default): 0.5 z (1 + tanh(a)) with
# a = sqrt(2 / pi) (z + 0.044715 z^3), written as z * sigmoid(2a).
_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _gelu_input(y: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``z = y + bias`` and ``2a = k (z + c z^3)``, float32."""
  z = (y + bias.astype(y.dtype)).astype(jnp.float32)
  return z, _GELU_K * (z + _GELU_C * z * z * z)


@jax.custom_vjp
def bias_gelu(y: jax.Array, bias: jax.Array) -> jax.Array:
  """``gelu(y + bias)`` (tanh approximation) with fast gradients.

  As autodiff writes it, XLA:CPU recomputes GELU's derivative inside both of
  its consumers, the bias-gradient reduce and the transposed copy in front
  of the kernel-gradient matmul, each a slow strided pass over the
  feed-forward activation. Here the
  derivative is materialised once and the bias gradient is ``channel_sum``.

  Args:
    y: ``[..., C]`` pre-activations (a matmul's output).
    bias: ``[C]``, cast to the dtype of ``y``.

  Returns:
    ``gelu(y + bias)`` in the dtype of ``y``.
  """
  z, a2 = _gelu_input(y, bias)
  # Ends in a divide, z / (1 + exp(-2a)), so that XLA computes the output
  # once instead of copying it into the next matmul's transposed operand.
  return (z / (1.0 + jnp.exp(-a2))).astype(y.dtype)


def _bias_gelu_fwd(y, bias):
  return bias_gelu(y, bias), (y, bias)


def _bias_gelu_bwd(res, dy):
  y, bias = res
  z, a2 = _gelu_input(y, bias)
  # gelu(z) = z s with s = 1 / (1 + e), e = exp(-2a), 2a' = k (1 + 3 c z^2):
  # gelu'(z) = s + z s (1 - s) 2a' = (1 + e + z 2a' e) / (1 + e)^2. Written
  # to end in that divide so that XLA computes dz once: as a cheap product
  # it was copied into the transposed operand of the kernel-gradient matmul
  # and recomputed there, slowly, element by element (an
  # optimization_barrier does not stop that on XLA:CPU; it is dropped before
  # fusion).
  # exp clamped at e^40: beyond it gelu' < 1e-15 and (1 + e)^2 would
  # overflow float32 (inf / inf = nan).
  e = jnp.exp(jnp.minimum(-a2, 40.0))
  da2 = _GELU_K * (1.0 + 3.0 * _GELU_C * z * z)
  one_e = 1.0 + e
  dz = (dy.astype(jnp.float32) * (one_e + z * da2 * e)) / (one_e * one_e)
  dz = dz.astype(y.dtype)
  return dz, channel_sum(dz).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


@jax.custom_vjp
def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """FiLM ``x * (1 + scale) + shift`` with channel-sum gradients.

  Args:
    x: ``[B, H, W, C]`` features.
    scale: ``[B, C]``.
    shift: ``[B, C]``.

  Returns:
    ``[B, H, W, C]`` in the dtype of ``x``.
  """
  return reference.modulate(x, scale, shift)


def _modulate_fwd(x, scale, shift):
  return modulate(x, scale, shift), (x, scale, jnp.zeros((0,), shift.dtype))


def _modulate_bwd(res, dy):
  x, scale, shift_proto = res
  b, c = x.shape[0], x.shape[-1]
  dx = dy * (1 + scale.astype(dy.dtype)[:, None, None, :])
  d_scale = channel_sum_per_example((dy * x).reshape(b, -1, c))   # [B, C]
  d_shift = channel_sum_per_example(dy.reshape(b, -1, c))         # [B, C]
  return (dx.astype(x.dtype), d_scale.astype(scale.dtype),
          d_shift.astype(shift_proto.dtype))


modulate.defvjp(_modulate_fwd, _modulate_bwd)
