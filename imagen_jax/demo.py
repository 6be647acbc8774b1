"""`imagen-demo`: the one-command main job on the embedded default.

Until the cascade, data and training issues land, this runs a smoke test of
the diffusion core only: every sampler draws from a known two-point mixture
with its exact denoiser, and the sampled proportions are printed beside the
true ones. It trains nothing and generates no images.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from imagen_jax import diffusion


def _mixture_denoiser(points, weights):
  def denoise(z, logsnr):
    alpha, sigma = diffusion.alpha_sigma(logsnr[:, None, None])
    logits = (-jnp.sum((z[:, None] - alpha * points[None]) ** 2, -1)
              / (2 * sigma[:, :, 0] ** 2) + jnp.log(weights))
    return jax.nn.softmax(logits, -1) @ points
  return denoise


def main(argv=None) -> int:
  """Runs the diffusion-core smoke test; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-samples", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  points = jnp.array([[-0.8, 0.4], [0.6, -0.5]])
  weights = jnp.array([0.3, 0.7])
  denoise = _mixture_denoiser(points, weights)
  schedule = diffusion.get_logsnr_schedule("cosine")
  print("diffusion-core smoke test: two-point mixture, weights 0.30 / 0.70")
  ok = True
  for sampler, steps in (("ancestral", 256), ("ddim", 25), ("dpmpp_2m", 25)):
    fn = jax.jit(lambda rng, s=sampler, n=steps: diffusion.sample(
        denoise, shape=(args.num_samples, 2), rng=rng, schedule=schedule,
        sampler=s, num_steps=n))
    start = time.perf_counter()
    x = jax.block_until_ready(fn(jax.random.PRNGKey(args.seed)))
    dist = jnp.linalg.norm(x[:, None] - points[None], axis=-1)
    on_point = float((dist.min(1) < 0.05).mean())
    frac0 = float((dist[:, 0] < 0.05).mean())
    ok &= on_point > 0.99 and abs(frac0 - 0.3) < 0.03
    print(f"  {sampler:9s} {steps:4d} steps: on a point {on_point:.3f}, "
          f"weight of point 0 {frac0:.3f} ({time.perf_counter() - start:.1f}s)")
  print("OK" if ok else "MISMATCH")
  return 0 if ok else 1


def run_main() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run_main()
