"""Closed-form checks of schedules, the forward process, losses and thresholds."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import diffusion as d


def test_schedules_endpoints_monotone_finite():
  t = jnp.linspace(0.0, 1.0, 1001)
  for name in d.SCHEDULE_NAMES:
    logsnr = np.asarray(d.get_logsnr_schedule(name)(t))
    assert np.all(np.isfinite(logsnr)), name
    assert np.all(np.diff(logsnr) <= 0), name
    assert logsnr[0] > 8 and logsnr[-1] < -10, name
    assert d.LOGSNR_MIN <= logsnr.min() and logsnr.max() <= d.LOGSNR_MAX


def test_cosine_closed_form():
  t = np.array([0.0, 0.1, 0.37, 0.5, 0.9, 0.99])
  s = 0.008
  expected = -np.log(np.cos((t + s) / (1 + s) * np.pi / 2) ** -2 - 1)
  got = d.get_logsnr_schedule("cosine")(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  # alpha^2 of the cosine schedule is Nichol & Dhariwal's cos^2 (unnormalised).
  alpha, _ = d.alpha_sigma(got)
  np.testing.assert_allclose(alpha**2, np.cos((t + s) / (1 + s) * np.pi / 2)**2,
                             rtol=1e-5, atol=1e-6)


def test_shift_adds_two_log_shift():
  t = jnp.linspace(0.05, 0.95, 19)
  base = d.get_logsnr_schedule("cosine")(t)
  shifted = d.get_logsnr_schedule("shifted_cosine", shift=0.25)(t)
  np.testing.assert_allclose(shifted - base, 2 * math.log(0.25), atol=1e-5)


def test_linear_matches_ddpm_betas():
  # The continuous linear schedule must track DDPM's discrete 1e-4..0.02 betas
  # over 1000 steps: alpha_bar_n = prod(1 - beta_i) at t = n / 1000.
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alpha_bar = np.cumprod(1 - betas)
  n = np.array([10, 100, 300, 500, 800, 999])
  discrete = np.log(alpha_bar[n] / (1 - alpha_bar[n]))
  cont = np.asarray(d.get_logsnr_schedule("linear")(jnp.asarray((n + 1) / 1000)))
  # The continuous form integrates beta; the discrete product also carries
  # sum(log(1 - beta)) + sum(beta) ~ -sum(beta^2) / 2 <= 0.067 at n = 999.
  np.testing.assert_allclose(cont, discrete, atol=0.08)


def test_logsnr_to_t_inverts():
  for name in d.SCHEDULE_NAMES:
    sched = d.get_logsnr_schedule(name)
    t = jnp.linspace(0.02, 0.98, 25)
    np.testing.assert_allclose(d.logsnr_to_t(sched, sched(t)), t, atol=2e-5)


def test_alpha_sigma_identities():
  logsnr = jnp.linspace(-20, 20, 81)
  alpha, sigma = d.alpha_sigma(logsnr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(alpha**2, jax.nn.sigmoid(logsnr), rtol=1e-5)
  np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), logsnr, atol=1e-4)


def test_q_sample_statistics():
  x = jnp.full((4096, 8), 0.7)
  logsnr = jnp.full((4096,), 0.5)
  z = d.q_sample(x, logsnr, jax.random.normal(jax.random.PRNGKey(0), x.shape))
  alpha, sigma = d.alpha_sigma(0.5)
  assert abs(float(z.mean()) - 0.7 * float(alpha)) < 0.01
  assert abs(float(z.std()) - float(sigma)) < 0.01


def test_posterior_closed_form_and_marginal():
  rng = np.random.default_rng(0)
  z_t = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  x = jnp.asarray(rng.uniform(-1, 1, size=(3, 5)), jnp.float32)
  lt, ls = jnp.array([-2.0, 0.0, 3.0]), jnp.array([-1.0, 1.5, 7.0])
  mean, var = d.posterior(z_t, x, lt, ls)
  a_t, s_t = (np.asarray(v)[:, None] for v in d.alpha_sigma(lt))
  a_s, s_s = (np.asarray(v)[:, None] for v in d.alpha_sigma(ls))
  # Classic form (Kingma et al. 2021, eq. 28) with alpha_{t|s} = alpha_t / alpha_s.
  a_ts = a_t / a_s
  s2_ts = s_t**2 - a_ts**2 * s_s**2
  np.testing.assert_allclose(
      mean, a_ts * s_s**2 / s_t**2 * z_t + a_s * s2_ts / s_t**2 * x, rtol=1e-5,
      atol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(var, mean.shape),
                             np.broadcast_to(s2_ts * s_s**2 / s_t**2, mean.shape),
                             rtol=1e-5)
  # Marginalising z_t ~ q(z_t | x) through the posterior must give q(z_s | x).
  coeff_z = a_ts * s_s**2 / s_t**2
  coeff_x = a_s * s2_ts / s_t**2
  np.testing.assert_allclose(coeff_z * a_t + coeff_x, a_s, rtol=1e-5)
  np.testing.assert_allclose(coeff_z**2 * s_t**2 + np.asarray(var), s_s**2,
                             rtol=1e-5)


def test_prediction_round_trips():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(4, 6, 6, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  logsnr = jnp.array([-5.0, -1.0, 2.0, 6.0])
  z = d.q_sample(x0, logsnr, eps)
  np.testing.assert_allclose(d.x0_from_eps(z, eps, logsnr), x0, atol=2e-4)
  np.testing.assert_allclose(d.eps_from_x0(z, x0, logsnr), eps, atol=2e-4)
  v = d.v_from_x0_eps(x0, eps, logsnr)
  np.testing.assert_allclose(d.x0_from_v(z, v, logsnr), x0, atol=1e-5)
  np.testing.assert_allclose(d.eps_from_v(z, v, logsnr), eps, atol=1e-5)
  for pred in d.PREDICTIONS:
    target = d.prediction_target(x0, eps, logsnr, pred)
    np.testing.assert_allclose(d.x0_from_prediction(z, target, logsnr, pred),
                               x0, atol=2e-4)


def test_dynamic_threshold_hand_cases():
  # Values inside [-1, 1]: s clamps to 1, nothing changes.
  x = jnp.array([[0.5, -0.9, 0.1, 0.0]])
  np.testing.assert_allclose(d.dynamic_threshold(x, 99.5), x)
  # 100th percentile of |x| = 4: everything is divided by 4.
  x = jnp.array([[4.0, -2.0, 1.0, 0.5]])
  np.testing.assert_allclose(d.dynamic_threshold(x, 100.0),
                             [[1.0, -0.5, 0.25, 0.125]])
  # 75th percentile of |x| = [0.5, 1, 2, 4] with linear interpolation is 2.5:
  # clip to [-2.5, 2.5] then divide by 2.5. Rows are independent.
  x = jnp.array([[4.0, -2.0, 1.0, 0.5], [0.2, 0.1, -0.3, 0.4]])
  np.testing.assert_allclose(
      d.dynamic_threshold(x, 75.0),
      [[1.0, -0.8, 0.4, 0.2], [0.2, 0.1, -0.3, 0.4]], rtol=1e-6)
  np.testing.assert_allclose(d.static_threshold(jnp.array([-3.0, 0.2, 1.5])),
                             [-1.0, 0.2, 1.0])


def test_loss_zero_for_oracle_and_weightings_match_their_spaces():
  rng = jax.random.PRNGKey(3)
  x = jax.random.uniform(jax.random.PRNGKey(4), (6, 4, 4, 3), minval=-1, maxval=1)
  sched = d.get_logsnr_schedule("cosine")
  noise_rng = jax.random.split(rng)[1]
  noise = jax.random.normal(noise_rng, x.shape)

  def oracle(pred):
    # Knows the true x and noise, so it predicts any target exactly.
    return lambda z, logsnr: d.prediction_target(x, noise, logsnr, pred)

  for pred in d.PREDICTIONS:
    loss, _ = d.diffusion_loss(oracle(pred), x, rng, schedule=sched,
                               prediction=pred)
    assert loss.shape == (6,)
    np.testing.assert_allclose(loss, 0.0, atol=1e-8)

  # A wrong x0 guess, scored under each prediction type with "v" weighting,
  # must give the same number: the v-space MSE of the implied prediction.
  guess = 0.3 * x
  losses = {}
  for pred in d.PREDICTIONS:
    def model(z, logsnr, pred=pred):
      eps_hat = d.eps_from_x0(z, guess, logsnr)
      return d.prediction_target(guess, eps_hat, logsnr, pred)
    losses[pred], aux = d.diffusion_loss(model, x, rng, schedule=sched,
                                         prediction=pred, weighting="v")
  np.testing.assert_allclose(losses["eps"], losses["v"], rtol=2e-3)
  np.testing.assert_allclose(losses["x0"], losses["v"], rtol=2e-3)
  # min-SNR weighting: x0-space weight min(snr, 5).
  snr = jnp.exp(aux["logsnr"])
  w = d.loss_weight(aux["logsnr"], prediction="x0", weighting="min_snr")
  np.testing.assert_allclose(w, jnp.minimum(snr, 5.0), rtol=1e-6)


def test_augment_lowres_level_and_statistics():
  sched = d.get_logsnr_schedule("cosine")
  x = jnp.full((2048, 4, 4, 3), -0.4)
  noised, level = d.augment_lowres(x, 0.3, jax.random.PRNGKey(0), schedule=sched)
  np.testing.assert_allclose(level, sched(jnp.full((2048,), 0.3)))
  alpha, sigma = d.alpha_sigma(level[0])
  assert abs(float(noised.mean()) + 0.4 * float(alpha)) < 0.01
  assert abs(float(noised.std()) - float(sigma)) < 0.01
  per_example, lv = d.augment_lowres(x[:3], jnp.array([0.0, 0.5, 1.0]),
                                     jax.random.PRNGKey(1), schedule=sched)
  assert per_example.shape == (3, 4, 4, 3)
  assert float(lv[0]) > float(lv[1]) > float(lv[2])
