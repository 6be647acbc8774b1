"""Sums over every axis but the channels, in a form XLA:CPU runs fast.

Reductions that keep only the narrow channel axis of an activation (bias
gradients, GroupNorm statistics and their gradients) are, as written, one
reduce over (B, H, W) with a [C] (or [B, C]) result. XLA:CPU runs those at
~1 GB/s: each output walks a stride-C column, with the elementwise producer
re-run inside the loop. A bias gradient at 32x32x192 took 7-11 ms on one
core. Summing a wide view first, ``[M / R, R * C]`` over its rows (a
vectorised accumulation of whole rows), then the ``[R, C]`` remainder, is
2-12x faster (benchmarks/RESULTS.md): the same numbers, summed in another
order, in float32.

``add_bias`` is ``y + bias`` with ``channel_sum`` as the bias gradient: the
autodiff gradient of a broadcast add is the slow reduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
