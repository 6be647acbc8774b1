"""Parity of schedules, q_sample and dynamic thresholding with diffusers.

diffusers (PyTorch) is an independent implementation installed only for tests.
"""

import diffusers
from diffusers.schedulers import ScoreSdeVpScheduler
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax import diffusion as d


def test_cosine_schedule_matches_diffusers_squaredcos():
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                  beta_schedule="squaredcos_cap_v2")
  ref = sched.alphas_cumprod.double().numpy()  # alpha_bar((i + 1) / 1000) / alpha_bar(0)
  betas = sched.betas.double().numpy()
  # Past this index diffusers caps beta at 0.999 and stops following cos^2.
  n = int(np.argmax(betas >= 0.999)) if np.any(betas >= 0.999) else 1000
  idx = np.arange(0, n, 7)
  logsnr = d.get_logsnr_schedule("cosine")(jnp.asarray((idx + 1) / 1000.0))
  alpha2 = np.asarray(d.alpha_sigma(logsnr)[0], np.float64) ** 2
  alpha2_0 = float(d.alpha_sigma(d.get_logsnr_schedule("cosine")(0.0))[0]) ** 2
  np.testing.assert_allclose(alpha2 / alpha2_0, ref[idx], atol=1e-5)


def test_linear_schedule_matches_diffusers_vp_sde():
  sched = ScoreSdeVpScheduler(beta_min=0.1, beta_max=20.0,
                                        num_train_timesteps=1000)
  sched.set_timesteps(1000)
  t = torch.linspace(0.02, 1.0, 50, dtype=torch.float64)
  # step_pred with x = 0 and score = 1 returns x_mean = beta_t dt / std, which
  # exposes the scheduler's marginal std(t) = sigma_t.
  _, x_mean = sched.step_pred(torch.ones(50, dtype=torch.float64),
                              torch.zeros(50, dtype=torch.float64), t)
  dt = -1.0 / 1000
  beta_t = 0.1 + t * (20.0 - 0.1)
  std = (beta_t * dt / x_mean).numpy()
  logsnr = d.get_logsnr_schedule("linear")(jnp.asarray(t.numpy(), jnp.float32))
  sigma = np.asarray(d.alpha_sigma(logsnr)[1])
  np.testing.assert_allclose(sigma, std, atol=1e-5)


def test_q_sample_matches_diffusers_add_noise():
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                  beta_schedule="linear")
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(5, 3, 8, 8)).astype(np.float32)
  noise = rng.normal(size=x.shape).astype(np.float32)
  steps = torch.tensor([0, 10, 250, 700, 999])
  ref = sched.add_noise(torch.from_numpy(x), torch.from_numpy(noise), steps)
  abar = sched.alphas_cumprod[steps].double().numpy()
  logsnr = jnp.asarray(np.log(abar / (1 - abar)), jnp.float32)
  ours = d.q_sample(jnp.asarray(x), logsnr, jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("percentile", [99.5, 90.0, 100.0])
def test_dynamic_threshold_matches_diffusers(percentile):
  sched = diffusers.DDPMScheduler(thresholding=True,
                                  dynamic_thresholding_ratio=percentile / 100,
                                  sample_max_value=1e9)
  rng = np.random.default_rng(1)
  x0 = (rng.normal(size=(4, 3, 16, 16)) * np.array([0.5, 1.0, 2.0, 4.0])[:, None, None, None]).astype(np.float32)
  ref = sched._threshold_sample(torch.from_numpy(x0)).numpy()
  ours = d.dynamic_threshold(jnp.asarray(x0), percentile)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
