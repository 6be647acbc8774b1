"""Continuous-time noise schedules expressed as log-SNR functions of t in [0, 1].

A schedule maps diffusion time ``t`` (0 = clean data, 1 = pure noise) to the
log signal-to-noise ratio ``logsnr = log(alpha^2 / sigma^2)`` of the variance
preserving process ``z_t = alpha_t * x + sigma_t * eps`` with
``alpha_t^2 + sigma_t^2 = 1``. Every other module speaks log-SNR, so samplers,
losses and networks never need to know which schedule produced a noise level.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import discrete

LogSNRFn = Callable[[jax.Array], jax.Array]

# Default clip of the log-SNR range. Beyond +-20 alpha^2 (or sigma^2) is below
# 2e-9, i.e. indistinguishable from 0 in float32, so nothing is lost; the clip
# keeps t = 0 and t = 1 finite for every schedule and every dtype.
LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0

SCHEDULE_NAMES = ("cosine", "linear", "shifted_cosine", discrete.SCHEDULE_NAME)


def _cosine(t: jax.Array, s: float) -> jax.Array:
  # Nichol & Dhariwal alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2)^2, taken
  # without the alpha_bar(0) normalisation, as in the continuous-time Imagen
  # formulation: logsnr = -log(cos(.)^-2 - 1). The 1e-5 floor mirrors that
  # formulation's log clamp (it only bites if s is set to ~0).
  cos = jnp.cos((t + s) / (1.0 + s) * math.pi * 0.5)
  return -jnp.log(jnp.maximum(cos**-2 - 1.0, 1e-5))


def _linear(t: jax.Array, beta_start: float, beta_end: float) -> jax.Array:
  # DDPM's linear betas 1e-4..0.02 over T = 1000 steps become the VP-SDE rate
  # beta(t) = beta_start + t * (beta_end - beta_start) with beta_start = 0.1,
  # beta_end = 20 (= T * 1e-4, T * 0.02). Then
  # -log(alpha_t^2) = int_0^t beta = beta_start t + (beta_end - beta_start) t^2 / 2
  # and logsnr = -log(expm1(that integral)).
  integral = beta_start * t + 0.5 * (beta_end - beta_start) * t**2
  return -jnp.log(jnp.expm1(integral))


def get_logsnr_schedule(
    name: str,
    *,
    shift: float = 1.0,
    s: float = 0.008,
    beta_start: float = 0.1,
    beta_end: float = 20.0,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> LogSNRFn:
  """Returns a log-SNR schedule ``fn(t) -> logsnr`` by name.

  Args:
    name: "cosine" (Nichol & Dhariwal, offset ``s``), "linear" (DDPM's linear
      betas in continuous form, used by Imagen's 1024 stage) or
      "shifted_cosine" (cosine with log-SNR + 2 log(shift), for resolutions
      other than the one a schedule was tuned for) or "discrete_cosine"
      (DeepFloyd IF's 1,000 training steps, ``discrete.logsnr_schedule``;
      ``shift`` and the clips do not apply to it).
    shift: multiplies the SNR by ``shift**2``; values below 1 add noise, which
      suits higher resolutions (e.g. 64 / 256). Applies to every schedule;
      "shifted_cosine" only makes the intent explicit.
    s: cosine offset that keeps the schedule away from alpha = 1 at t = 0.
    beta_start: continuous-time beta at t = 0 for "linear" (T * beta_1).
    beta_end: continuous-time beta at t = 1 for "linear" (T * beta_T).
    logsnr_min: lower clip, reached at or near t = 1.
    logsnr_max: upper clip, reached at or near t = 0.

  Returns:
    A jit-able function mapping an array of t in [0, 1] to log-SNR (same
    shape, float32 unless t has a wider float type).
  """
  if name not in SCHEDULE_NAMES:
    raise ValueError(
        f"Unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}.")
  if shift <= 0:
    raise ValueError(f"Schedule shift must be > 0, got {shift}; use 1.0 for none.")
  if not logsnr_min < logsnr_max:
    raise ValueError(
        f"logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max}).")
  if name == discrete.SCHEDULE_NAME:
    return discrete.logsnr_schedule()
  offset = 2.0 * math.log(shift)

  def schedule(t: jax.Array) -> jax.Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
      t = t.astype(jnp.float32)
    if name == "linear":
      logsnr = _linear(t, beta_start, beta_end)
    else:
      logsnr = _cosine(t, s)
    return jnp.clip(logsnr + offset, logsnr_min, logsnr_max)

  return schedule


def logsnr_to_t(
    schedule: LogSNRFn, logsnr: jax.Array, *, iterations: int = 40
) -> jax.Array:
  """Inverts a (monotonically decreasing) schedule by bisection.

  Works for any schedule, so samplers can start from a given noise level
  (img2img, super-resolution from a partially noised input) whatever the
  schedule's closed form.

  Args:
    schedule: a function from ``get_logsnr_schedule``.
    logsnr: target log-SNR values, any shape.
    iterations: bisection steps; 40 halvings reach float32 resolution in t.

  Returns:
    t in [0, 1] with ``schedule(t) ~= logsnr`` (clamped to the schedule's
    range when the target lies outside it).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  lo = jnp.zeros_like(logsnr)
  hi = jnp.ones_like(logsnr)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    # Decreasing schedule: too much signal at mid means the answer is later.
    later = schedule(mid) > logsnr
    return jnp.where(later, mid, lo), jnp.where(later, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
  return 0.5 * (lo + hi)
