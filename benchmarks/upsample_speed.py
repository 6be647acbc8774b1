"""The U-Net's upsampling layer: low-resolution phase convolutions vs plain.

  python benchmarks/upsample_speed.py

``layers.Upsample`` (nearest x2 + 3x3 conv computed as four 2x2 convolutions
of the low-res input) against the textbook layer (materialise the upsampled
image, then convolve), same parameters, forward and forward+backward (input
and kernel gradients), at the shapes of the CPU-scale configs' upsampling
layers, batch 8. Both are checked to agree before timing.
"""

from __future__ import annotations

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.models import layers

# (H, W, Cin, Cout) of the up-path resampling layers, input side.
SHAPES = {
    "demo SR up_0": (32, 32, 32, 32),
    "demo SR up_1": (16, 16, 64, 32),
    "demo SR up_2": (8, 8, 128, 64),
    "base64:cpu up_1": (16, 16, 128, 128),
    "base64:cpu up_2": (8, 8, 192, 192),
}


def measure(name, shape, batch):
  h, w, cin, cout = shape
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(batch, h, w, cin), jnp.float32)
  ours, plain = layers.Upsample(cout), layers.UpsampleReference(cout)
  params = nn.unbox(plain.init(jax.random.PRNGKey(0), x))
  ct = jnp.asarray(rs.randn(batch, 2 * h, 2 * w, cout), jnp.float32)
  row = [name, f"{batch}x{h}x{w}x{cin}->{cout}"]
  outs = []
  for module in (plain, ours):
    fwd = jax.jit(module.apply)
    grad = jax.jit(jax.grad(lambda p, x, ct, m=module: jnp.sum(m.apply(p, x) * ct),
                            argnums=(0, 1)))
    outs.append(fwd(params, x))
    row += [common.time_call(lambda: common.block(fwd(params, x)), 9) * 1e3,
            common.time_call(lambda: common.block(grad(params, x, ct)), 9) * 1e3]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
  row.append(row[3] / row[5])
  return row


def main():
  print(common.machine_line())
  rows = [measure(name, shape, 8) for name, shape in SHAPES.items()]
  print("\nUpsample layer, ms (median of 9); last column: plain fwd+bwd / ours")
  common.print_table(["layer", "input", "plain fwd", "plain fwd+bwd",
                      "ours fwd", "ours fwd+bwd", "speed-up fwd+bwd"], rows)


if __name__ == "__main__":
  main()
