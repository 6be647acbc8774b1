"""GroupNorm fused with its per-channel affine and activation, with a hand VJP.

``group_norm_act(x, scale, shift)`` computes

    act(GroupNorm(x) * scale + shift)        x: [B, H, W, C]; scale, shift: [B, C]

where ``scale`` / ``shift`` already fold the norm's own parameters together
with any FiLM conditioning (``gamma * (1 + s)``, ``beta * (1 + s) + t``).

Why a custom VJP: autodiff of the plain formula differentiates the mean and
the variance paths separately, and XLA then re-fuses the elementwise chain
(normalise, FiLM, SiLU) into each of five to seven full-size reductions. On
XLA:CPU those reductions dominated a U-Net training step. The closed-form
backward needs two reductions over H x W (of ``g`` and ``g * xhat``, where
``g`` is the incoming gradient through the activation); the group means of
``dxhat`` and ``dxhat * xhat`` follow from those two [B, C] sums, so ``dx`` is
one more elementwise pass:

    dx = rstd * (g * scale - mean_group(g * scale) - xhat * mean_group(g * scale * xhat))

Only ``x`` and the [B, G] statistics are kept for the backward pass (the same
activation memory as autodiff keeps). Statistics and arithmetic are float32
whatever the input dtype; the output has ``dtype``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from imagen_jax.kernels import reference
from imagen_jax.kernels.channel_sum import channel_sum_per_example



def _group_stats(xf: jax.Array, groups: int, eps: float
                 ) -> tuple[jax.Array, jax.Array]:
  """Per-(example, group) mean and std of ``xf`` ``[B, N, C]`` float32."""
  b, n, c = xf.shape
  count = n * (c // groups)
  # One pass over x for both sums, taken around a per-group shift (the
  # group's mean at the first position): E[x^2] - E[x]^2 loses float32
  # precision when the mean is large against the spread (mean 30, std 0.1:
  # variance off by 0.04), E[(x-k)^2] - E[x-k]^2 only when k is far from
  # the mean.
  shift = xf[:, 0, :].reshape(b, groups, -1).mean(-1)                # [B, G]
  xs = xf - _per_channel(shift, c)[:, None, :]                       # [B, N, C]
  # Reduce over N per channel first, then over the group's channels: XLA:CPU
  # is slow at reductions that keep a middle (group) axis.
  s1 = channel_sum_per_example(xs).reshape(b, groups, -1).sum(-1)    # [B, G]
  s2 = channel_sum_per_example(jnp.square(xs)).reshape(
      b, groups, -1).sum(-1)                                         # [B, G]
  mean_s = s1 / count
  var = jnp.maximum(s2 / count - jnp.square(mean_s), 0.0)
  return shift + mean_s, jnp.sqrt(var + eps)


def _per_channel(v: jax.Array, c: int) -> jax.Array:
  """[B, G] -> [B, C]: each group's value repeated over its channels."""
  return jnp.repeat(v, c // v.shape[1], axis=1)


def _affine(mean, std, scale, shift, c):
  """Folds stats and affine into y = x * a + b per (example, channel).

  Every [B, C] coefficient here and in the backward pass ends in a divide.
  XLA fuses cheap producers into their consumers, and the consumers are
  full-size loops that broadcast the coefficients over H x W: a coefficient
  ending in a multiply or add (with the FiLM projection and the statistics
  behind it) was recomputed for every pixel, and those loops ran at a third
  of their memory speed on XLA:CPU. A divide counts as expensive, and XLA
  does not copy an expensive op into a consumer that reuses its elements, so
  the coefficients are computed once.
  """
  std_c = _per_channel(std, c)                       # [B, C]
  mean_c = _per_channel(mean, c)                     # [B, C]
  a = scale / std_c
  b = (shift * std_c - mean_c * scale) / std_c       # shift - mean * a
  return a, b, mean_c, std_c


def _activate(u: jax.Array, act: Optional[str]) -> jax.Array:
  if act != "silu":
    return u
  # SiLU written to end in a divide, not as u * sigmoid(u): XLA copies cheap
  # elementwise producers into every consumer, and the consumers of this
  # output include the layout transposes that XLA:CPU puts in front of each
  # conv weight gradient ([B, H, W, C] -> [C, H, W, B]). Re-running the norm
  # inside those strided loops cost more than the transposes themselves. A
  # divide counts as expensive, so the output is computed once and the
  # transposes only move it (benchmarks/RESULTS.md has the step times).
  # exp(-u) -> inf for u << 0 gives -0.
  return u / (1.0 + jnp.exp(-u))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, scale, shift, groups, eps, act, dtype):
  y, _ = _fused_fwd(x, scale, shift, groups, eps, act, dtype)
  return y


def _fused_fwd(x, scale, shift, groups, eps, act, dtype):
  c = x.shape[-1]
  xf = x.astype(jnp.float32)                         # [B, N, C]
  mean, std = _group_stats(xf, groups, eps)
  a, b, _, _ = _affine(mean, std, scale, shift, c)
  u = xf * a[:, None, :] + b[:, None, :]
  return _activate(u, act).astype(dtype), (x, mean, std, scale, shift)


def _fused_bwd(groups, eps, act, dtype, res, dy):
  del eps, dtype
  x, mean, std, scale, shift = res
  c = x.shape[-1]
  n = x.shape[1]
  xf = x.astype(jnp.float32)                         # [B, N, C]
  a, b, mean_c, std_c = _affine(mean, std, scale, shift, c)
  g = dy.astype(jnp.float32)
  if act == "silu":
    u = xf * a[:, None, :] + b[:, None, :]
    sig = jax.nn.sigmoid(u)
    g = g * sig * (1.0 + u * (1.0 - sig))
  rstd_c = 1.0 / std_c
  xhat = (xf - mean_c[:, None, :]) * rstd_c[:, None, :]
  d_shift = channel_sum_per_example(g)               # [B, C]
  d_scale = channel_sum_per_example(g * xhat)        # [B, C]
  count = n * (c // groups)
  bsz = x.shape[0]
  # Group means of dxhat = g * scale and of dxhat * xhat, from the [B, C] sums.
  m1 = (scale * d_shift).reshape(bsz, groups, -1).sum(-1) / count  # [B, G]
  m2 = (scale * d_scale).reshape(bsz, groups, -1).sum(-1) / count  # [B, G]
  m1_c, m2_c = _per_channel(m1, c), _per_channel(m2, c)
  # dx = rstd * (g * scale - m1 - xhat * m2), folded into g * k + x * k1 + k0.
  # (Divides for the reason in _affine.)
  k = scale / std_c
  k1 = -m2_c / jnp.square(std_c)
  k0 = -(m1_c + mean_c * k1 * std_c) / std_c        # -rstd * m1 - mean * k1
  dx = g * k[:, None, :] + xf * k1[:, None, :] + k0[:, None, :]
  return dx.astype(x.dtype), d_scale, d_shift


_fused.defvjp(_fused_fwd, _fused_bwd)


def group_norm_act(x: jax.Array, scale: jax.Array, shift: jax.Array, *,
                   num_groups: int, epsilon: float = 1e-5,
                   activation: Optional[str] = None, dtype: Any = None
                   ) -> jax.Array:
  """act(GroupNorm(x) * scale + shift) with float32 statistics.

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
  reference.check_group_norm(x, num_groups, activation)
  bsz, h, w, c = x.shape
  scale = jnp.broadcast_to(scale.astype(jnp.float32), (bsz, c))
  shift = jnp.broadcast_to(shift.astype(jnp.float32), (bsz, c))
  y = _fused(x.reshape(bsz, h * w, c), scale, shift, num_groups,
             float(epsilon), activation, jnp.dtype(dtype or x.dtype))
  return y.reshape(bsz, h, w, c)
