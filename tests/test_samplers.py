"""Samplers against exact denoisers, guidance and the sampler loop's structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as d

MU = jnp.array([0.5, -0.3, 0.0, 0.2])
STD = jnp.array([0.6, 0.3, 1.0, 0.45])
SCHED = d.get_logsnr_schedule("cosine")


def gaussian_denoiser(z, logsnr):
  """E[x | z] for x ~ N(MU, diag(STD^2)): the optimal x0-predictor."""
  alpha, sigma = d.alpha_sigma(logsnr[:, None])
  gain = alpha * STD**2 / (alpha**2 * STD**2 + sigma**2)
  return MU + gain * (z - alpha * MU)


POINTS = jnp.array([[-0.8, 0.4], [0.6, -0.5]])
WEIGHTS = jnp.array([0.3, 0.7])


def mixture_denoiser(z, logsnr):
  """E[x | z] for a two-point mixture: a softmax-weighted average of points."""
  alpha, sigma = d.alpha_sigma(logsnr[:, None, None])
  logits = (-jnp.sum((z[:, None] - alpha * POINTS[None]) ** 2, -1)
            / (2 * sigma[:, :, 0] ** 2) + jnp.log(WEIGHTS))
  return jax.nn.softmax(logits, -1) @ POINTS


# (sampler, steps, relative std tolerance). DDIM is a first-order solver: on
# Gaussian data each step shrinks the spread by cos(dphi) (phi = atan of the
# noise-to-signal angle), ~6% in all at 25 steps; the others are within ~3%.
CASES = [("ancestral", 256, 0.04), ("ddim", 25, 0.09), ("dpmpp_2m", 25, 0.04)]


@pytest.mark.parametrize("sampler,steps,tol", CASES)
def test_sampler_matches_gaussian_data(sampler, steps, tol):
  fn = jax.jit(lambda rng: d.sample(gaussian_denoiser, shape=(16384, 4),
                                    rng=rng, schedule=SCHED, sampler=sampler,
                                    num_steps=steps))
  x = fn(jax.random.PRNGKey(0))
  # 16384 samples: the standard error of a mean of unit std is 0.008.
  np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
  np.testing.assert_allclose(x.std(0) / STD, 1.0, atol=tol)


@pytest.mark.parametrize("sampler,steps,tol", CASES)
def test_sampler_matches_two_point_mixture(sampler, steps, tol):
  del tol
  fn = jax.jit(lambda rng: d.sample(mixture_denoiser, shape=(8192, 2), rng=rng,
                                    schedule=SCHED, sampler=sampler,
                                    num_steps=steps))
  x = fn(jax.random.PRNGKey(1))
  dist = jnp.linalg.norm(x[:, None] - POINTS[None], axis=-1)  # [N, 2]
  # Every sample lands on one of the two points, in the right proportion.
  assert float((dist.min(1) < 0.05).mean()) > 0.99
  assert abs(float((dist[:, 0] < 0.05).mean()) - 0.3) < 0.03


def test_ddim_eta_one_is_stochastic_eta_zero_deterministic():
  def run(eta, seed_noise):
    return d.sample(gaussian_denoiser, shape=(4, 4), rng=seed_noise,
                    schedule=SCHED, sampler="ddim", num_steps=10, eta=eta)
  # Same key, same sample; eta = 1 draws fresh noise at every step.
  a = run(0.0, jax.random.PRNGKey(5))
  b = run(0.0, jax.random.PRNGKey(5))
  np.testing.assert_array_equal(a, b)
  c = run(1.0, jax.random.PRNGKey(5))
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_start_from_noised_data_keeps_distribution():
  # SDEdit / SR refinement: data noised to a mid level and denoised with the
  # exact denoiser must stay distributed as the data.
  x = MU + STD * jax.random.normal(jax.random.PRNGKey(2), (16384, 4))
  for sampler in ("ancestral", "ddim", "dpmpp_2m"):
    out = jax.jit(lambda rng, x: d.sample(
        gaussian_denoiser, shape=x.shape, rng=rng, schedule=SCHED,
        sampler=sampler, num_steps=100, init_x=x, start_logsnr=0.0))(
            jax.random.PRNGKey(3), x)
    np.testing.assert_allclose(out.mean(0), MU, atol=0.03)
    np.testing.assert_allclose(out.std(0) / STD, 1.0, atol=0.05)
  # Starting almost clean returns almost the input.
  out = d.sample(gaussian_denoiser, shape=x[:8].shape, rng=jax.random.PRNGKey(4),
                 schedule=SCHED, sampler="ddim", num_steps=3, init_x=x[:8],
                 start_logsnr=8.0)
  assert float(jnp.abs(out - x[:8]).max()) < 0.1


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp_2m"])
def test_collapsed_time_grid_is_finite(sampler):
  # Starting at t = 0 collapses the grid to one level: every step is h = 0,
  # leaves z as it is, and the result is one denoiser call on the start.
  x = MU + STD * jax.random.normal(jax.random.PRNGKey(5), (8, 4))
  top = float(SCHED(jnp.zeros((), jnp.float32)))
  run = lambda n: d.sample(
      lambda z, logsnr: jnp.tanh(z), shape=x.shape, rng=jax.random.PRNGKey(6),
      schedule=SCHED, sampler=sampler, num_steps=n, init_x=x,
      start_logsnr=top)
  out = run(4)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, run(1), rtol=1e-5, atol=1e-5)


def test_sampler_loop_is_a_scan_traced_once():
  traces = []

  def counting(z, logsnr):
    traces.append(1)
    return gaussian_denoiser(z, logsnr)

  for steps in (5, 50):
    traces.clear()
    jaxpr = jax.make_jaxpr(lambda rng: d.sample(
        counting, shape=(2, 4), rng=rng, schedule=SCHED, sampler="dpmpp_2m",
        num_steps=steps))(jax.random.PRNGKey(0))
    assert len(traces) == 1
    assert "scan" in str(jaxpr)


def test_guidance_scales_and_single_batched_call():
  calls = []

  def model_fn(z, logsnr, cond):
    calls.append(z.shape[0])
    # An eps-predictor whose output depends on the conditioning vector.
    return 0.1 * z + cond[:, None, None, :]

  z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  logsnr = jnp.full((3,), 0.5)
  cond = jnp.ones((3, 2))
  uncond = jnp.zeros((3, 2))
  kw = dict(cond=cond, uncond=uncond, prediction="eps", threshold="none")
  out1 = d.make_guided_denoiser(model_fn, guidance_scale=1.0, **kw)(z, logsnr)
  assert calls == [6]  # one call on 2B examples
  ref_cond = d.x0_from_eps(z, model_fn(z, logsnr, cond), logsnr)
  ref_uncond = d.x0_from_eps(z, model_fn(z, logsnr, uncond), logsnr)
  np.testing.assert_allclose(out1, ref_cond, rtol=1e-5, atol=1e-5)
  out0 = d.make_guided_denoiser(model_fn, guidance_scale=0.0, **kw)(z, logsnr)
  np.testing.assert_allclose(out0, ref_uncond, rtol=1e-5, atol=1e-5)
  out3 = d.make_guided_denoiser(model_fn, guidance_scale=3.0, **kw)(z, logsnr)
  np.testing.assert_allclose(out3, ref_uncond + 3.0 * (ref_cond - ref_uncond),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      d.classifier_free_guidance(jnp.array(2.0), jnp.array(1.0), 4.0), 5.0)

  # Inside a whole sampling loop: one traced network call per step on 2B.
  calls.clear()
  den = d.make_guided_denoiser(model_fn, guidance_scale=5.0, cond=cond,
                               uncond=uncond, threshold="dynamic")
  jax.make_jaxpr(lambda rng: d.sample(den, shape=z.shape, rng=rng,
                                      schedule=SCHED, num_steps=20))(
                                          jax.random.PRNGKey(0))
  assert calls == [6]


def test_dynamic_threshold_composes_with_dpmpp():
  # A badly scaled denoiser (x0 estimates far outside [-1, 1]) stays in range.
  def wild(z, logsnr):
    return 5.0 * gaussian_denoiser(z, logsnr)

  def thresholded(z, logsnr):
    return d.dynamic_threshold(wild(z, logsnr), 99.5)

  x = d.sample(thresholded, shape=(64, 4), rng=jax.random.PRNGKey(0),
               schedule=SCHED, sampler="dpmpp_2m", num_steps=25)
  assert bool(jnp.all(jnp.isfinite(x)))
  assert float(jnp.abs(x).max()) <= 1.0 + 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "Unknown sampler 'euler'; choose one of ancestral, ddim, dpmpp_2m"),
    (dict(num_steps=0), "num_steps must be an integer >= 1, got 0"),
    (dict(spacing="karras"), "Unknown step spacing 'karras'"),
    (dict(eta=1.5), "eta must be within"),
])
def test_sample_bad_input(kwargs, match):
  args = dict(shape=(2, 4), rng=jax.random.PRNGKey(0), schedule=SCHED)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    d.sample(gaussian_denoiser, **args)


def test_schedule_and_threshold_bad_input():
  with pytest.raises(ValueError, match="Unknown schedule 'quadratic'; choose one of cosine, linear, shifted_cosine"):
    d.get_logsnr_schedule("quadratic")
  for p in (50.0, 101.0, 0.995):
    with pytest.raises(ValueError, match=f"percentile {p} is outside \\(50, 100\\]"):
      d.dynamic_threshold(jnp.ones((1, 4)), p)
  with pytest.raises(ValueError, match="Unknown prediction 'score'"):
    d.make_guided_denoiser(lambda *a: a[0], cond=jnp.ones(1), uncond=jnp.ones(1),
                           guidance_scale=1.0, prediction="score")
  with pytest.raises(ValueError, match="Unknown loss weighting 'snr'"):
    d.loss_weight(jnp.zeros(2), prediction="eps", weighting="snr")
