"""Training loss of one diffusion stage in continuous time."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.schedules import LogSNRFn

WEIGHTINGS = ("none", "min_snr", "v")

# model_fn(z [B, ...], logsnr [B]) -> prediction [B, ...]
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_weighting(weighting: str) -> None:
  """Raises a one-line ValueError for an unknown loss weighting."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of "
                     f"{', '.join(WEIGHTINGS)}.")


def loss_weight(
    logsnr: jax.Array, *, prediction: str, weighting: str,
    min_snr_gamma: float = 5.0,
) -> jax.Array:
  """Per-example weight applied to the MSE in the prediction's own space.

  Every weighting is defined by its weight on the x0-space MSE, then moved to
  the prediction's space using ``mse_eps = snr * mse_x0`` and
  ``mse_v = (1 + snr) * mse_x0`` (both at a fixed noisy input z).

  Args:
    logsnr: ``[B]`` noise levels of the examples.
    prediction: "eps", "x0" or "v": what the network predicts.
    weighting: "none" (plain MSE of the prediction), "min_snr" (Hang et al.
      2023: x0 weight min(snr, gamma)) or "v" (equivalent to a v-space MSE:
      x0 weight 1 + snr).
    min_snr_gamma: the gamma of "min_snr".

  Returns:
    ``[B]`` weights.
  """
  gaussian.check_prediction(prediction)
  check_weighting(weighting)
  if weighting == "none":
    return jnp.ones_like(logsnr)
  snr = jnp.exp(logsnr)
  if weighting == "min_snr":
    x0_weight = jnp.minimum(snr, min_snr_gamma)
  else:
    x0_weight = 1.0 + snr
  # How much the prediction-space MSE scales the x0-space MSE.
  space = {"eps": snr, "x0": jnp.ones_like(snr), "v": 1.0 + snr}[prediction]
  return x0_weight / space


def diffusion_loss(
    model_fn: ModelFn,
    x: jax.Array,
    rng: jax.Array,
    *,
    schedule: LogSNRFn,
    prediction: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example denoising loss for one stage.

  Draws t ~ U[0, 1] independently per example, noises ``x`` to
  ``logsnr = schedule(t)`` and regresses the network output on the target of
  its prediction type.

  Args:
    model_fn: ``(z [B, H, W, C], logsnr [B]) -> prediction [B, H, W, C]``;
      a closure that already holds params, text and low-res conditioning.
    x: clean images ``[B, H, W, C]`` in [-1, 1].
    rng: PRNG key for t and the noise.
    schedule: log-SNR schedule.
    prediction: "eps" (Imagen's default), "x0" or "v".
    weighting: "none", "min_snr" or "v"; see ``loss_weight``.
    min_snr_gamma: gamma of the min-SNR weighting.

  Returns:
    (loss ``[B]``, aux) where aux holds ``t`` and ``logsnr`` ``[B]`` (for
    per-noise-level metrics) and the unweighted MSE ``[B]``.
  """
  gaussian.check_prediction(prediction)
  check_weighting(weighting)
  t_rng, noise_rng = jax.random.split(rng)
  batch = x.shape[0]
  t = jax.random.uniform(t_rng, (batch,), jnp.float32)
  logsnr = schedule(t)
  noise = jax.random.normal(noise_rng, x.shape, jnp.float32)
  z = gaussian.q_sample(x.astype(jnp.float32), logsnr, noise)
  pred = model_fn(z, logsnr).astype(jnp.float32)
  target = gaussian.prediction_target(x, noise, logsnr, prediction)
  mse = jnp.mean(jnp.square(pred - target).reshape(batch, -1), axis=-1)
  weight = loss_weight(logsnr, prediction=prediction, weighting=weighting,
                       min_snr_gamma=min_snr_gamma)
  return weight * mse, {"t": t, "logsnr": logsnr, "mse": mse}
