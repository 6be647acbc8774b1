"""Diffusion math in log-SNR terms: pure, jit-able functions (no modules)."""

from imagen_jax.diffusion.augment import augment_lowres
from imagen_jax.diffusion.gaussian import (
    PREDICTIONS, alpha_sigma, eps_from_v, eps_from_x0, posterior,
    prediction_target, q_sample, v_from_x0_eps, x0_from_eps,
    x0_from_prediction, x0_from_v)
from imagen_jax.diffusion.guidance import (
    THRESHOLDS, apply_threshold, check_threshold, classifier_free_guidance,
    dynamic_threshold, make_denoiser, make_guided_denoiser, static_threshold)
from imagen_jax.diffusion.losses import WEIGHTINGS, diffusion_loss, loss_weight
from imagen_jax.diffusion.samplers import (
    SAMPLERS, Sampler, register_sampler, sample)
from imagen_jax.diffusion.schedules import (
    LOGSNR_MAX, LOGSNR_MIN, SCHEDULE_NAMES, get_logsnr_schedule, logsnr_to_t)

__all__ = [
    "PREDICTIONS", "SAMPLERS", "SCHEDULE_NAMES", "THRESHOLDS", "WEIGHTINGS",
    "LOGSNR_MAX", "LOGSNR_MIN", "Sampler", "alpha_sigma", "apply_threshold",
    "augment_lowres", "check_threshold", "classifier_free_guidance",
    "diffusion_loss",
    "dynamic_threshold", "eps_from_v", "eps_from_x0", "get_logsnr_schedule",
    "logsnr_to_t", "loss_weight", "make_denoiser", "make_guided_denoiser",
    "posterior", "prediction_target", "q_sample", "register_sampler", "sample",
    "static_threshold", "v_from_x0_eps", "x0_from_eps", "x0_from_prediction",
    "x0_from_v",
]
