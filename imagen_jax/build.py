"""Turns config sections into modules and example inputs (config is read here once)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax import config_defaults
from imagen_jax.models.unet import UNet


def unet_kwargs(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``UNet`` keyword arguments of a ``config.model`` section.

  Every field declared in ``config_defaults.MODEL`` is a ``UNet`` field of the
  same name and passes through as is (tuple fields as tuples, so the module
  stays hashable); nothing is copied by hand. A field missing from an older
  workdir's config takes its declared default.

  Args:
    model: the ``model`` ConfigDict (see ``config_defaults.MODEL``).

  Returns:
    Field name -> value, one per declared model field.
  """
  out = {}
  for name, spec in config_defaults.MODEL.items():
    # A workdir written before a field was declared lacks it: its default.
    value = model.get(name, spec.default)
    out[name] = tuple(value) if spec.kind is tuple else value
  return out


def build_unet(model: ml_collections.ConfigDict) -> UNet:
  """Builds the U-Net described by a ``config.model`` section.

  Args:
    model: the ``model`` ConfigDict (see ``config_defaults.MODEL``).

  Returns:
    An unbound ``UNet`` module.
  """
  return UNet(**unet_kwargs(model))


def unet_inputs(config: ml_collections.ConfigDict, batch: int, text_len: int,
                resolution: int | None = None) -> dict[str, Any]:
  """Zero inputs with the shapes a stage's U-Net takes (for init and tracing).

  Args:
    config: a full stage config.
    batch: batch size.
    text_len: number of text tokens.
    resolution: image size; defaults to the training size of the stage (the
      crop size for stages trained on crops).

  Returns:
    Keyword arguments for ``UNet.__call__``/``init``.
  """
  res = resolution or int(config.train_crop) or int(config.resolution)
  ch = int(config.model.in_channels)
  inputs = dict(
      x=jnp.zeros((batch, res, res, ch), jnp.float32),
      logsnr=jnp.zeros((batch,), jnp.float32),
      text=jnp.zeros((batch, text_len, int(config.model.text_dim)), jnp.float32),
      text_mask=jnp.ones((batch, text_len), bool),
  )
  if config.model.lowres_cond:
    scale = int(config.resolution) // int(config.lowres_resolution)
    low = res // scale
    inputs["lowres"] = jnp.zeros((batch, low, low, ch), jnp.float32)
    inputs["aug_logsnr"] = jnp.zeros((batch,), jnp.float32)
  return inputs


def param_shapes(module: nn.Module, inputs: dict[str, Any]) -> Any:
  """Abstract (ShapeDtypeStruct) params of ``module``; allocates nothing."""
  variables = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), **inputs))
  return variables["params"]


def check_model(config: ml_collections.ConfigDict) -> None:
  """Traces a stage's U-Net init on its input shapes (no compile, no memory).

  Fields that each pass the schema can still not fit together: num_groups
  not dividing a level's width, a per-level tuple of the wrong length, a
  resolution the levels cannot halve. The U-Net raises its one-line error
  then, and so does this, before any data is read or workdir written.

  Args:
    config: a full stage config.

  Raises:
    ValueError: the U-Net's message (TypeError for a shape jax refuses).
  """
  param_shapes(build_unet(config.model), unet_inputs(config, 1, 4))


def count_params(params: Any) -> int:
  """Number of scalars in a (possibly boxed or abstract) param tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.unbox(params)))
