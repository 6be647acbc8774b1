"""Sampler speed: wall time of ``sample()`` with a guided U-Net, compile apart.

  python benchmarks/sampler_speed.py [--config=tiny|cpu] [--batch=4]

Prints, per sampler and step count, the compile time of the whole jitted
sampling loop and the run time, for a U-Net with classifier-free guidance
(one network call on 2B per step). Then the per-step overhead of the sampler
loop itself: the same loop with an exact closed-form denoiser on tiny shapes,
as a fraction of one guided U-Net step.

Targets: compile time independent of num_steps (the loop is a lax.scan, not
unrolled); loop overhead per step under 5% of a tiny U-Net step.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import diffusion
from tests import helpers


def guided_sample_fn(module, params, text, mask, sampler, steps, shape):
  def model_fn(z, logsnr, cond):
    return module.apply({"params": params}, z, logsnr, cond[0], cond[1])
  null = (jnp.zeros_like(text), jnp.zeros_like(mask))
  denoise = diffusion.make_guided_denoiser(
      model_fn, cond=(text, mask), uncond=null, guidance_scale=5.0,
      threshold="dynamic")
  schedule = diffusion.get_logsnr_schedule("cosine")
  return jax.jit(lambda rng: diffusion.sample(
      denoise, shape=shape, rng=rng, schedule=schedule, sampler=sampler,
      num_steps=steps))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()
  print(common.machine_line())
  config = helpers.load_config("base64", args.config)
  module, params, _ = helpers.init_unet("base64", variant=args.config)
  res = int(config.resolution)
  shape = (args.batch, res, res, 3)
  rs = np.random.RandomState(0)
  text = jnp.asarray(rs.standard_normal((args.batch, 16, int(config.model.text_dim))),
                     jnp.float32)
  mask = jnp.ones((args.batch, 16), bool)

  rows = []
  for sampler in ("ancestral", "ddim", "dpmpp_2m"):
    for steps in (25, 50, 250):
      fn = guided_sample_fn(module, params, text, mask, sampler, steps, shape)
      start = time.perf_counter()
      compiled = fn.lower(jax.random.PRNGKey(0)).compile()
      compile_s = time.perf_counter() - start
      run_s = common.time_call(
          lambda: common.block(compiled(jax.random.PRNGKey(1))), repeats=2)
      rows.append([sampler, steps, compile_s, run_s, run_s / steps * 1e3,
                   args.batch / run_s])
  print(f"\nGuided sampling, base64:{args.config} U-Net at {res}x{res}, batch "
        f"{args.batch} (network batch {2 * args.batch})")
  common.print_table(["sampler", "steps", "compile s", "run s", "ms/step",
                      "images/s"], rows)
  comp = {s: [r[2] for r in rows if r[0] == s] for s in ("ancestral", "ddim", "dpmpp_2m")}
  print("\ncompile time at 250 steps / at 25 steps: " + ", ".join(
      f"{s} {c[2] / c[0]:.2f}x" for s, c in comp.items()))

  # Loop overhead: exact Gaussian denoiser, same shapes, vs one U-Net call.
  mu, std = 0.1, 0.5

  def exact(z, logsnr):
    alpha, sigma = diffusion.alpha_sigma(logsnr[:, None, None, None])
    return mu + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (z - alpha * mu)

  schedule = diffusion.get_logsnr_schedule("cosine")
  null = (jnp.zeros_like(text), jnp.zeros_like(mask))
  unet_step = jax.jit(lambda z, ls: module.apply(
      {"params": params}, jnp.concatenate([z, z]), jnp.concatenate([ls, ls]),
      jnp.concatenate([text, null[0]]), jnp.concatenate([mask, null[1]])))
  z = jnp.zeros(shape)
  ls = jnp.zeros((args.batch,))
  common.block(unet_step(z, ls))
  unet_s = common.time_call(lambda: common.block(unet_step(z, ls)), repeats=10)
  rows = []
  for sampler in ("ancestral", "ddim", "dpmpp_2m"):
    steps = 250
    fn = jax.jit(lambda rng, s=sampler: diffusion.sample(
        exact, shape=shape, rng=rng, schedule=schedule, sampler=s,
        num_steps=steps))
    common.block(fn(jax.random.PRNGKey(0)))
    loop_s = common.time_call(lambda: common.block(fn(jax.random.PRNGKey(1))),
                              repeats=5) / steps
    rows.append([sampler, loop_s * 1e6, unet_s * 1e6, loop_s / unet_s])
  print("\nSampler loop overhead per step (exact denoiser) vs one guided "
        "U-Net call (target < 5%)")
  common.print_table(["sampler", "loop us/step", "U-Net us/call", "ratio"], rows)


if __name__ == "__main__":
  main()
