"""Prints a stage's parameter count and forward FLOPs per example.

  python -m imagen_jax.tools.param_count --config=configs/base64.py

Nothing is allocated: params come from ``jax.eval_shape`` and FLOPs from XLA's
cost analysis of the lowered (uncompiled) forward pass at the stage's sampling
resolution with ``--text_len`` text tokens.
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from imagen_jax import build

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.",
                                          lock_config=True)
_TEXT_LEN = flags.DEFINE_integer("text_len", 128, "Text tokens per example.")


def forward_flops(config, text_len: int) -> float:
  """FLOPs of one forward pass for one example at the sampling resolution."""
  module = build.build_unet(config.model)
  inputs = build.unet_inputs(config, 1, text_len,
                             resolution=int(config.resolution))
  params = build.param_shapes(module, build.unet_inputs(config, 1, text_len))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
  lowered = jax.jit(lambda p, kw: module.apply({"params": p}, **kw)).lower(
      params, abstract)
  return float(lowered.cost_analysis()["flops"])


def main(argv):
  del argv
  config = _CONFIG.value
  module = build.build_unet(config.model)
  params = build.param_shapes(module, build.unet_inputs(config, 1, _TEXT_LEN.value))
  print(f"params: {build.count_params(params)}")
  print(f"forward_flops_per_example: {forward_flops(config, _TEXT_LEN.value):.6g}")
  return 0


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  app.run(main)
