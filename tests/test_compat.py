"""Checkpoints and exports written by earlier code load and give the same outputs.

The fixtures in tests/data/compat/ (see make_compat.py there) were written by
the U-Net code before its layers became plain Flax modules behind the kernel
boundary: a training workdir with one checkpoint and an export, for a tiny
base stage and a tiny Efficient U-Net SR stage, with inputs and the outputs
the raw and EMA params gave then.
"""

import os

import jax
import numpy as np
import pytest

from imagen_jax import cascade
from imagen_jax import parallel

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "compat")


def _io(name):
  data = np.load(os.path.join(DATA, f"{name}_io.npz"))
  inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
  return inputs, data["out_params"], data["out_ema"]


def _outputs(loaded, inputs, kernels=None):
  unet = loaded.stage.unet
  if kernels is not None:
    unet = unet.clone(kernels=kernels)
  return np.asarray(jax.jit(lambda p, kw: unet.apply({"params": p}, **kw))(
      loaded.params, inputs))


@pytest.mark.parametrize("kernels", ["reference", "xla_cpu"])
@pytest.mark.parametrize("name", ["base", "sr"])
def test_checkpoint_and_export_give_the_stored_outputs(name, kernels):
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  inputs, out_params, out_ema = _io(name)
  assert np.abs(out_ema).mean() > 0.05   # live params, not a zero output
  workdir = os.path.join(DATA, name)
  raw = cascade.load_stage(workdir, mesh, use_ema=False)
  ema = cascade.load_stage(workdir, mesh, use_ema=True)
  export = cascade.load_stage(os.path.join(DATA, f"{name}_export"), mesh)
  assert raw.step == 7
  np.testing.assert_allclose(_outputs(raw, inputs, kernels), out_params,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_outputs(ema, inputs, kernels), out_ema,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_outputs(export, inputs, kernels), out_ema,
                             rtol=1e-5, atol=1e-5)
