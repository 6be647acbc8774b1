"""Noise conditioning augmentation for super-resolution stages (Imagen Sec. 2.5).

The low-res input of an SR stage is corrupted with the same Gaussian process
at an "aug level" t in [0, 1]; the stage is told that level (as log-SNR), so at
sampling time a fixed level (0.1-0.3 in the paper) makes the SR stage robust to
artifacts of the stage below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import LogSNRFn


def augment_lowres(
    x_lowres: jax.Array,
    aug_level: float | jax.Array,
    rng: jax.Array,
    *,
    schedule: LogSNRFn,
) -> tuple[jax.Array, jax.Array]:
  """Noises a low-res conditioning image to an augmentation level.

  Args:
    x_lowres: low-res images ``[B, h, w, C]`` in [-1, 1] (already upsampled
      or not; the math is per pixel).
    aug_level: time t in [0, 1], a scalar or ``[B]``; 0 is the least noise the
      schedule has, 1 pure noise.
    rng: PRNG key for the noise.
    schedule: the log-SNR schedule that interprets ``aug_level``.

  Returns:
    (noised low-res ``[B, h, w, C]``, aug log-SNR ``[B]`` to condition on).
  """
  batch = x_lowres.shape[0]
  t = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (batch,))
  logsnr = schedule(t)
  noise = jax.random.normal(rng, x_lowres.shape, jnp.float32)
  return gaussian.q_sample(x_lowres.astype(jnp.float32), logsnr, noise), logsnr
