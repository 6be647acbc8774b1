"""Samplers for the reverse process, each one ``lax.scan`` over steps.

All samplers consume an x0-denoiser ``denoise_fn(z, logsnr) -> x0_hat`` (built
by ``guidance.make_guided_denoiser``), so guidance and thresholding compose
with every sampler. The time grid is uniform in t from ``start_t`` (1 unless
starting from a partially noised image) to 0, both included; the call at
t = 0 returns the denoiser's x0 estimate, so N steps cost exactly N network
calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import discrete
from imagen_jax.diffusion import gaussian
from imagen_jax.diffusion.guidance import DenoiseFn
from imagen_jax.diffusion.schedules import LogSNRFn, logsnr_to_t


@dataclasses.dataclass(frozen=True)
class StepInput:
  """What one sampler step sees besides its own carried state."""
  z: jax.Array          # [B, ...] current noisy sample at logsnr_t
  x0: jax.Array         # [B, ...] denoiser estimate at (z, logsnr_t)
  logsnr_t: jax.Array   # [B] current (lower) log-SNR
  logsnr_s: jax.Array   # [B] target (higher) log-SNR
  first: jax.Array      # [] bool: the first step of the loop
  rng: jax.Array        # key for this step's fresh noise
  eta: float            # DDIM stochasticity
  noise: Optional[jax.Array] = None       # this step's noise, when fixed
  var_interp: Optional[jax.Array] = None  # learned-variance channels in [-1, 1]

  def fresh_noise(self) -> jax.Array:
    """Standard normal noise for this step (the fixed draw when given)."""
    if self.noise is not None:
      return self.noise
    return jax.random.normal(self.rng, self.z.shape, self.z.dtype)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler: its carried state and its update from t to s.

  Attributes:
    init: ``z -> state`` extra state carried between steps (pytree).
    step: ``(StepInput, state) -> (z_s, state)``.
    spacing: the grid it uses unless told otherwise ("uniform" or "logsnr").
  """
  init: Callable[[jax.Array], Any]
  step: Callable[[StepInput, Any], tuple[jax.Array, Any]]
  spacing: str = "uniform"


SPACINGS = ("uniform", "logsnr")


def _logsnr_grid(schedule: LogSNRFn, start_t: jax.Array, num_steps: int,
                 spacing: str) -> jax.Array:
  """The N + 1 log-SNR levels of the loop (the last one is never used).

  N network calls sit at levels from schedule(start_t) up to schedule(0), both
  ends included: ending on t = 0 lets the last call denoise the least noisy
  level the schedule has (ending on t = 1/N instead would return the posterior
  mean at that level, whose spread is visibly shrunk for few steps).
  "uniform" is uniform in t (the training distribution of levels; DDPM and
  DDIM practice); "logsnr" is uniform in log-SNR, which equalises the step
  size h of DPM-Solver's exponential integrator (its paper's choice for
  pixel-space models).
  """
  frac = jnp.arange(num_steps + 1, dtype=jnp.float32) / max(num_steps - 1, 1)
  frac = jnp.minimum(frac, 1.0)
  if spacing == "uniform":
    return schedule(start_t * (1.0 - frac))
  lo, hi = schedule(start_t), schedule(jnp.zeros((), jnp.float32))
  return lo + frac * (hi - lo)


def _bcast(level, x):
  return level.reshape(level.shape + (1,) * (x.ndim - level.ndim))


def _ancestral_step(inp: StepInput, state):
  mean, var = gaussian.posterior(inp.z, inp.x0, inp.logsnr_t, inp.logsnr_s)
  if inp.var_interp is not None:
    # A network with learned variance (IF) interpolates its own variance
    # between the posterior's and beta's.
    var = discrete.learned_variance(inp.var_interp, inp.logsnr_t,
                                    inp.logsnr_s)
  return mean + jnp.sqrt(var) * inp.fresh_noise(), state


def _ddim_step(inp: StepInput, state):
  eps = gaussian.eps_from_x0(inp.z, inp.x0, inp.logsnr_t)
  alpha_s, sigma_s = gaussian.alpha_sigma(_bcast(inp.logsnr_s, inp.z))
  _, post_var = gaussian.posterior(inp.z, inp.x0, inp.logsnr_t, inp.logsnr_s)
  c2 = inp.eta**2 * post_var
  noise = inp.fresh_noise()
  z_s = (alpha_s * inp.x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0)) * eps
         + jnp.sqrt(c2) * noise)
  return z_s, state


def _dpmpp_2m_init(z):
  # Previous x0 estimate and previous step size in half-log-SNR.
  return (jnp.zeros_like(z), jnp.ones(z.shape[:1], z.dtype))


def _dpmpp_2m_step(inp: StepInput, state):
  # DPM-Solver++(2M), Lu et al. 2022, data-prediction form, with
  # lambda = logsnr / 2: z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D
  # where D extrapolates x0 linearly in lambda from the last two estimates.
  x0_prev, h_prev = state
  h = 0.5 * (inp.logsnr_s - inp.logsnr_t)  # [B] >= 0
  # A zero step (the grid's repeated last level, or a grid collapsed to one
  # level when starting at t = 0) is first order: r = h_prev / h would be
  # inf or 0/0 = NaN there.
  second = jnp.logical_and(jnp.logical_not(inp.first),
                           jnp.logical_and(h > 0, h_prev > 0))       # [B]
  r = _bcast(jnp.where(second, h_prev / jnp.where(second, h, 1.0), 1.0), inp.z)
  d2 = (1.0 + 0.5 / r) * inp.x0 - (0.5 / r) * x0_prev
  d = jnp.where(_bcast(second, inp.z), d2, inp.x0)
  alpha_s, sigma_s = gaussian.alpha_sigma(_bcast(inp.logsnr_s, inp.z))
  _, sigma_t = gaussian.alpha_sigma(_bcast(inp.logsnr_t, inp.z))
  z_s = (sigma_s / sigma_t) * inp.z - alpha_s * jnp.expm1(-_bcast(h, inp.z)) * d
  return z_s, (inp.x0, h)


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(init=lambda z: (), step=_ancestral_step),
    "ddim": Sampler(init=lambda z: (), step=_ddim_step),
    "dpmpp_2m": Sampler(init=_dpmpp_2m_init, step=_dpmpp_2m_step,
                        spacing="logsnr"),
}


def register_sampler(name: str, sampler: Sampler) -> None:
  """Adds a sampler to the registry under ``name``."""
  SAMPLERS[name] = sampler


def check_sampler(name: str) -> None:
  """Raises a one-line ValueError for an unknown sampler name."""
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; choose one of "
                     f"{', '.join(sorted(SAMPLERS))}.")


def check_num_steps(num_steps: int) -> None:
  """Raises a one-line ValueError unless num_steps is an integer >= 1."""
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")


def sample(
    denoise_fn: DenoiseFn,
    *,
    shape: tuple[int, ...],
    rng: jax.Array,
    schedule: LogSNRFn,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    init_x: Optional[jax.Array] = None,
    start_logsnr: Optional[float | jax.Array] = None,
    spacing: Optional[str] = None,
    logsnr_levels: Optional[Any] = None,
    noise: Optional[tuple[jax.Array, jax.Array]] = None,
    progress_fn: Optional[Callable[[jax.Array], None]] = None,
) -> jax.Array:
  """Draws samples by integrating the reverse process with ``num_steps`` calls.

  The whole loop is one ``lax.scan``: under ``jit`` it compiles once per
  (shape, num_steps), and its compile time does not grow with num_steps.

  Args:
    denoise_fn: ``(z [B, ...], logsnr [B]) -> x0_hat [B, ...]``.
    shape: output shape ``[B, H, W, C]``.
    rng: PRNG key (initial noise and per-step noise).
    schedule: log-SNR schedule used for the time grid.
    sampler: "ancestral", "ddim" or "dpmpp_2m" (or a registered name).
    num_steps: network calls; >= 1.
    eta: DDIM stochasticity in [0, 1] (0 = deterministic DDIM, 1 = the
      ancestral posterior variance); ignored by the other samplers.
    init_x: optional clean image ``shape`` to start from (img2img / SR
      refinement); it is noised to ``start_logsnr`` first.
    start_logsnr: the log-SNR to start at; required with ``init_x``.
    spacing: "uniform" (in t) or "logsnr"; None takes the sampler's own
      (uniform for ancestral and DDIM, logsnr for DPM-Solver++).
    logsnr_levels: explicit levels ``[num_steps]`` of the network calls,
      noisiest first (a discrete schedule's respacing, e.g. IF's
      ``smart27``); replaces the grid from ``schedule`` and ``spacing``.
    noise: fixed draws ``(initial [shape], per step [num_steps, *shape])``
      instead of ones from ``rng`` (to reproduce another implementation's
      run); the last step's is never used.
    progress_fn: optional host callback called with the step index.

  ``denoise_fn`` may return ``(x0_hat, var_interp)`` for a network with
  learned variance: the ancestral sampler then uses it, the others ignore it.

  Returns:
    Samples ``shape`` (float32), the final step's x0 estimate.
  """
  check_sampler(sampler)
  check_num_steps(num_steps)
  if isinstance(eta, (int, float)) and not 0.0 <= eta <= 1.0:
    raise ValueError(f"DDIM eta must be within [0, 1], got {eta}.")
  if spacing is not None and spacing not in SPACINGS:
    raise ValueError(f"Unknown step spacing {spacing!r}; choose one of "
                     f"{', '.join(SPACINGS)}.")
  if (init_x is None) != (start_logsnr is None):
    raise ValueError("init_x and start_logsnr go together: pass both to start "
                     "from a noised image, or neither to start from noise.")
  spec = SAMPLERS[sampler]
  batch = shape[0]
  init_rng, loop_rng = jax.random.split(rng)
  if logsnr_levels is not None:
    logsnr_levels = jnp.asarray(logsnr_levels, jnp.float32)
    if logsnr_levels.shape != (num_steps,):
      raise ValueError(f"logsnr_levels has shape {logsnr_levels.shape}; give "
                       f"one level per step ({num_steps}).")
  step_noise = None
  if noise is None:
    noise = jax.random.normal(init_rng, shape, jnp.float32)
  else:
    noise, step_noise = (jnp.asarray(n, jnp.float32) for n in noise)
  if init_x is None:
    start_t = jnp.ones((), jnp.float32)
    z = noise
  else:
    start_t = logsnr_to_t(schedule, jnp.asarray(start_logsnr, jnp.float32))
    start_t = jnp.reshape(start_t, ())
    z = gaussian.q_sample(init_x.astype(jnp.float32),
                          jnp.full((batch,), schedule(start_t)), noise)

  steps = jnp.arange(num_steps)
  if logsnr_levels is not None:
    logsnr_grid = jnp.concatenate([logsnr_levels, logsnr_levels[-1:]])
  else:
    logsnr_grid = _logsnr_grid(schedule, start_t, num_steps,
                               spacing or spec.spacing)
  keys = jax.random.split(loop_rng, num_steps)
  if step_noise is None:
    step_noise = jnp.zeros((num_steps, 0), jnp.float32)  # unused placeholder
  fixed = step_noise.shape[1:] == tuple(shape)

  def body(carry, xs):
    z, state = carry
    i, logsnr_t, logsnr_s, key, n = xs
    logsnr_t = jnp.full((batch,), logsnr_t)
    logsnr_s = jnp.full((batch,), logsnr_s)
    out = denoise_fn(z, logsnr_t)
    var_interp = None
    if isinstance(out, tuple):
      out, var_interp = out
      var_interp = var_interp.astype(jnp.float32)
    x0 = out.astype(jnp.float32)
    inp = StepInput(z=z, x0=x0, logsnr_t=logsnr_t, logsnr_s=logsnr_s,
                    first=i == 0, rng=key, eta=eta,
                    noise=n if fixed else None, var_interp=var_interp)
    z_s, state = spec.step(inp, state)
    # The last call is at t = 0: return its x0 estimate itself.
    z_next = jnp.where(i == num_steps - 1, x0, z_s)
    if progress_fn is not None:
      jax.debug.callback(progress_fn, i)
    return (z_next, state), None

  (z, _), _ = jax.lax.scan(
      body, (z, spec.init(z)),
      (steps, logsnr_grid[:-1], logsnr_grid[1:], keys, step_noise))
  return z
