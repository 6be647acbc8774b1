"""Discrete DDPM schedules in log-SNR terms: DeepFloyd IF's 1,000 cosine steps.

IF was trained on the 1,000-step discretisation of the cosine schedule
(Nichol & Dhariwal): ``beta_i = min(1 - abar((i + 1) / T) / abar(i / T),
0.999)``, ``alphas_cumprod = cumprod(1 - beta)``. Step ``i`` is the log-SNR
``log(acp_i / (1 - acp_i))``. Everything else here speaks log-SNR, so this
module only provides

* the table of the T levels (``step_logsnrs``),
* a continuous-time view ``t -> logsnr`` for our samplers (step = t * T,
  clipped to T - 1, linear in between: t = 1 is step 999, t = 0.25 step 250),
* the inverse, step index from log-SNR, which IF's network embeds,
* IF's respacing presets (``smart27``, ``fast27``, ...) as step lists, and
  the learned-variance interpolation IF's ancestral sampler uses.

The table is computed in float64 and stored as float32; the sampler's levels
are exactly those float32 values, so the network recovers exact step indices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_STEPS = 1000
# The schedule's name in configs (diffusion.schedule): the one schedule that
# sample.timesteps respaces.
SCHEDULE_NAME = "discrete_cosine"

# IF's section respacings (steps per tenth-or-so of the schedule), by name.
# Each string splits [0, T) into len(sections) equal parts and takes that
# many evenly spaced steps from each (improved-diffusion's space_timesteps).
RESPACINGS = {
    "fast27": "10,10,3,2,2",
    "smart27": "7,4,2,1,2,4,7",
    "smart50": "10,6,4,3,2,2,3,4,6,10",
    "smart100": "1,1,1,1,2,2,2,2,2,2,3,3,4,4,5,5,6,7,7,8,9,10,13",
    "smart185": "1,1,2,2,2,3,3,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20",
}


@functools.lru_cache(maxsize=None)
def _tables(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  def abar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = np.array([min(1.0 - abar((i + 1) / num_steps) / abar(i / num_steps),
                        0.999) for i in range(num_steps)], np.float64)
  acp = np.cumprod(1.0 - betas)
  logsnr = np.log(acp) - np.log1p(-acp)
  return acp, logsnr.astype(np.float32)


def alphas_cumprod(num_steps: int = NUM_STEPS) -> np.ndarray:
  """IF's ``alphas_cumprod`` ``[T]`` (float64)."""
  return _tables(num_steps)[0]


def step_logsnrs(num_steps: int = NUM_STEPS) -> np.ndarray:
  """Log-SNR of each discrete step ``[T]`` (float32, decreasing)."""
  return _tables(num_steps)[1]


def step_from_logsnr(logsnr: jax.Array, num_steps: int = NUM_STEPS
                     ) -> jax.Array:
  """Fractional step index of a log-SNR (exact on the table's levels).

  Args:
    logsnr: any shape.
    num_steps: T.

  Returns:
    float32 step indices in [0, T - 1], shape of ``logsnr``.
  """
  table = step_logsnrs(num_steps)
  # interp needs increasing abscissae: walk the table backwards.
  xp = jnp.asarray(table[::-1].copy())
  fp = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.float32)
  return jnp.interp(jnp.asarray(logsnr, jnp.float32), xp, fp)


def logsnr_schedule(num_steps: int = NUM_STEPS):
  """The discrete schedule as ``t in [0, 1] -> logsnr`` (step = t * T).

  Returns:
    A jit-able function of an array of t.
  """
  table = jnp.asarray(step_logsnrs(num_steps))

  def schedule(t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    pos = jnp.clip(t * num_steps, 0.0, num_steps - 1.0)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, num_steps - 1)
    frac = pos - lo.astype(jnp.float32)
    return jnp.where(frac == 0, table[lo],
                     table[lo] * (1.0 - frac) + table[hi] * frac)

  return schedule


def respaced_steps(spec: str, num_steps: int = NUM_STEPS) -> list[int]:
  """IF's respaced step indices, decreasing (the order they are sampled in).

  Args:
    spec: a preset name (``RESPACINGS``), a section list like "10,10,3,2,2",
      or an explicit decreasing step list "steps:999,500,0".
    num_steps: T.

  Returns:
    Distinct step indices, decreasing.
  """
  if spec.startswith("steps:"):
    steps = [int(s) for s in spec[len("steps:"):].split(",") if s.strip()]
    if (not steps or any(not 0 <= s < num_steps for s in steps)
        or any(a <= b for a, b in zip(steps, steps[1:]))):
      raise ValueError(f"Step list {spec!r} must be decreasing indices in "
                       f"[0, {num_steps - 1}], e.g. 'steps:999,500,0'.")
    return steps
  sections_spec = RESPACINGS.get(spec, spec)
  try:
    counts = [int(c) for c in sections_spec.split(",")]
  except ValueError:
    raise ValueError(f"Unknown respacing {spec!r}; use one of "
                     f"{', '.join(RESPACINGS)}, a section list like "
                     "'10,10,3,2,2' or 'steps:999,500,0'.") from None
  size, extra = divmod(num_steps, len(counts))
  start, out = 0, set()
  for i, count in enumerate(counts):
    length = size + (1 if i < extra else 0)
    if count > length or count < 1:
      raise ValueError(f"Respacing {spec!r}: section {i} of {length} steps "
                       f"cannot take {count}.")
    stride = (length - 1) / (count - 1) if count > 1 else 1
    cur = 0.0
    for _ in range(count):
      out.add(start + round(cur))
      cur += stride
    start += length
  return sorted(out, reverse=True)


def respaced_logsnrs(spec: str, num_steps: int = NUM_STEPS) -> np.ndarray:
  """The log-SNR levels ``[N]`` of a respacing, noisiest first (float32)."""
  return step_logsnrs(num_steps)[np.asarray(respaced_steps(spec, num_steps))]


def learned_variance(var_interp: jax.Array, logsnr_t: jax.Array,
                     logsnr_s: jax.Array) -> jax.Array:
  """IF's learned ancestral variance between levels t (noisier) and s.

  ``log var = f log(beta) + (1 - f) log(max(posterior var, 1e-20))`` with
  ``f = (v + 1) / 2`` from the network's variance channels ``v``, where
  ``beta = 1 - alpha_t^2 / alpha_s^2`` and the posterior variance is that of
  q(z_s | z_t, x) (improved DDPM's "learned_range").

  Args:
    var_interp: ``v`` in [-1, 1], ``[B, ...]``.
    logsnr_t, logsnr_s: ``[B]`` levels, ``logsnr_s > logsnr_t``.

  Returns:
    The variance, shape of ``var_interp``.
  """
  shape = (-1,) + (1,) * (var_interp.ndim - 1)
  lt, ls = logsnr_t.reshape(shape), logsnr_s.reshape(shape)
  log_a2_t, log_a2_s = jax.nn.log_sigmoid(lt), jax.nn.log_sigmoid(ls)
  beta = -jnp.expm1(log_a2_t - log_a2_s)
  post = -jnp.expm1(lt - ls) * jax.nn.sigmoid(-ls)
  frac = (var_interp + 1.0) / 2.0
  log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(
      jnp.maximum(post, 1e-20))
  return jnp.exp(log_var)
