"""The Gaussian forward process in log-SNR terms.

``z_t = alpha_t x + sigma_t eps`` with ``alpha^2 = sigmoid(logsnr)`` and
``sigma^2 = sigmoid(-logsnr)``. Noise levels are arrays of shape ``[B]`` (or
scalars); they are broadcast against images ``[B, H, W, C]`` from the left.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v")


def _bcast(level: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example level ``[B]`` to broadcast against ``x``."""
  level = jnp.asarray(level)
  return level.reshape(level.shape + (1,) * (x.ndim - level.ndim))


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Signal and noise scales of a variance preserving process.

  Args:
    logsnr: log(alpha^2 / sigma^2), any shape.

  Returns:
    (alpha, sigma), each the shape of ``logsnr``, with alpha^2 + sigma^2 = 1.
  """
  logsnr = jnp.asarray(logsnr)
  # sqrt(sigmoid) is computed from log-sigmoid to stay accurate at large |logsnr|.
  return (jnp.exp(0.5 * jax.nn.log_sigmoid(logsnr)),
          jnp.exp(0.5 * jax.nn.log_sigmoid(-logsnr)))


def q_sample(x: jax.Array, logsnr: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples ``z ~ q(z_t | x) = N(alpha_t x, sigma_t^2 I)``.

  Args:
    x: clean data ``[B, ...]``.
    logsnr: per-example log-SNR ``[B]`` (or a scalar).
    noise: standard normal noise, shape of ``x``.

  Returns:
    The noised data ``z_t``, shape of ``x``.
  """
  alpha, sigma = alpha_sigma(_bcast(logsnr, x))
  return alpha * x + sigma * noise


def posterior(
    z_t: jax.Array, x: jax.Array, logsnr_t: jax.Array, logsnr_s: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Mean and variance of ``q(z_s | z_t, x)`` for ``logsnr_s > logsnr_t``.

  Args:
    z_t: noisy data at the later (noisier) time ``[B, ...]``.
    x: clean data (or its estimate) ``[B, ...]``.
    logsnr_t: log-SNR at time t ``[B]`` or scalar.
    logsnr_s: log-SNR at the earlier time s ``[B]`` or scalar.

  Returns:
    (mean ``[B, ...]``, variance broadcastable to it).
  """
  logsnr_t = _bcast(logsnr_t, z_t)
  logsnr_s = _bcast(logsnr_s, z_t)
  alpha_t, _ = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  # r = SNR_t / SNR_s; expm1 keeps 1 - r accurate when the two levels are close.
  r = jnp.exp(logsnr_t - logsnr_s)
  one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
  mean = r * (alpha_s / alpha_t) * z_t + one_minus_r * alpha_s * x
  var = one_minus_r * sigma_s**2
  return mean, var


def eps_from_x0(z: jax.Array, x0: jax.Array, logsnr: jax.Array) -> jax.Array:
  """eps = (z - alpha x0) / sigma."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return (z - alpha * x0) / sigma


def x0_from_eps(z: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
  """x0 = (z - sigma eps) / alpha."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return (z - sigma * eps) / alpha


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
  """v = alpha eps - sigma x0 (Salimans & Ho, progressive distillation)."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, x0))
  return alpha * eps - sigma * x0


def x0_from_v(z: jax.Array, v: jax.Array, logsnr: jax.Array) -> jax.Array:
  """x0 = alpha z - sigma v."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return alpha * z - sigma * v


def eps_from_v(z: jax.Array, v: jax.Array, logsnr: jax.Array) -> jax.Array:
  """eps = sigma z + alpha v."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return sigma * z + alpha * v


def check_prediction(prediction: str) -> None:
  """Raises a one-line ValueError for an unknown prediction type."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of "
                     f"{', '.join(PREDICTIONS)}.")


def x0_from_prediction(
    z: jax.Array, pred: jax.Array, logsnr: jax.Array, prediction: str
) -> jax.Array:
  """Converts a network output of type ``prediction`` to an x0 estimate.

  Args:
    z: the network's noisy input ``[B, ...]``.
    pred: the network output, shape of ``z``.
    logsnr: noise level of ``z`` ``[B]``.
    prediction: "eps", "x0" or "v".

  Returns:
    x0 estimate, shape of ``z``.
  """
  check_prediction(prediction)
  if prediction == "eps":
    return x0_from_eps(z, pred, logsnr)
  if prediction == "v":
    return x0_from_v(z, pred, logsnr)
  return pred


def prediction_target(
    x0: jax.Array, eps: jax.Array, logsnr: jax.Array, prediction: str
) -> jax.Array:
  """The regression target of a network that predicts ``prediction``."""
  check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "v":
    return v_from_x0_eps(x0, eps, logsnr)
  return x0
