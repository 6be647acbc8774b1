"""Writes the compatibility fixtures that tests/test_compat.py reads.

  PYTHONPATH=. python tests/data/compat/make_compat.py

For a tiny base stage and a tiny super-resolution (Efficient U-Net) stage it
writes a training workdir (config.json, text_encoder.json and one orbax
checkpoint of the whole train state), an export of it (imagen-export's
layout) and ``io.npz``: fixed inputs with the outputs that the raw and the
EMA params gave with the code that wrote them. The fixtures were written
before the models moved to plain Flax layers behind the kernel boundary;
re-running this script overwrites them with the current code's outputs, so
only do that for a deliberate change of parameter layout or numerics.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from imagen_jax import build  # noqa: E402
from imagen_jax import cascade  # noqa: E402
from imagen_jax.train import checkpoint as ckpt_lib  # noqa: E402
from imagen_jax.train import optim  # noqa: E402
from imagen_jax.train import state as state_lib  # noqa: E402
from tests import helpers  # noqa: E402


def _shrink(config):
  """Smaller than the test configs, so the fixtures stay small on disk."""
  m = config.model
  m.base_channels = 8
  m.head_dim = 8
  m.num_groups = 4
  m.cond_dim = 16
  m.ff_mult = 2
  m.dtype = "float32"
  return config


def _configs():
  base = _shrink(helpers.load_config("base64", "tiny"))
  sr = _shrink(helpers.load_config("sr256", "tiny"))
  return {"base": base, "sr": sr}


def _perturbed(tree, seed, scale):
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + scale * rs.standard_normal(
          p.shape).astype(np.float32)) if p.dtype == jnp.float32 else p, tree)


def write_stage(name, config, out_root):
  """Writes ``<name>/`` (workdir), ``<name>_export/`` and ``<name>_io.npz``."""
  workdir = os.path.join(out_root, name)
  export = os.path.join(out_root, f"{name}_export")
  for d in (workdir, export):
    shutil.rmtree(d, ignore_errors=True)
  os.makedirs(workdir)
  module = build.build_unet(config.model)
  init_inputs = build.unet_inputs(config, 1, 4)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), **init_inputs))["params"]
  # Live params: zero-initialised output layers would make every output 0.
  params = _perturbed(params, 1, 0.05)
  ema = _perturbed(params, 2, 0.02)
  tx, _ = optim.make_optimizer(config.optimizer, int(config.total_steps))
  opt_state = _perturbed(tx.init(params), 3, 0.01)
  state = state_lib.TrainState(
      step=jnp.asarray(7, jnp.int32), params=params, opt_state=opt_state,
      ema_params=ema, skipped=jnp.zeros((), jnp.int32),
      total_skipped=jnp.zeros((), jnp.int32))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f, indent=1)
  spec = {"t5": config.text.t5, "source": config.text.source,
          "config": {"d_model": int(config.model.text_dim)}}
  with open(os.path.join(workdir, "text_encoder.json"), "w") as f:
    json.dump(spec, f)
  ckptr = ckpt_lib.Checkpointer(workdir, async_save=False)
  ckptr.save(7, state, {"data": "compat fixture"})
  ckptr.close()
  cascade.export_stage(workdir, export)

  inputs = helpers.random_inputs(build.unet_inputs(config, 2, 5), seed=4,
                                 valid_tokens=[5, 2])
  apply = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
  arrays = {f"in_{k}": np.asarray(v) for k, v in inputs.items()}
  arrays["out_params"] = np.asarray(apply(params, inputs))
  arrays["out_ema"] = np.asarray(apply(ema, inputs))
  np.savez(os.path.join(out_root, f"{name}_io.npz"), **arrays)


def main():
  for name, config in _configs().items():
    write_stage(name, config, HERE)
  print("wrote", HERE)


if __name__ == "__main__":
  main()
