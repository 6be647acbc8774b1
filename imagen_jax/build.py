"""Turns config sections into modules and example inputs (config is read here once)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax.models.unet import UNet


def build_unet(model: ml_collections.ConfigDict) -> UNet:
  """Builds the U-Net described by a ``config.model`` section.

  Args:
    model: the ``model`` ConfigDict (see ``config_defaults.model_defaults``).

  Returns:
    An unbound ``UNet`` module.
  """
  return UNet(
      base_channels=int(model.base_channels),
      channel_mult=tuple(int(m) for m in model.channel_mult),
      num_res_blocks=tuple(int(n) for n in model.num_res_blocks),
      self_attn=tuple(bool(a) for a in model.self_attn),
      cross_attn=tuple(bool(a) for a in model.cross_attn),
      efficient=bool(model.efficient),
      mid_attn=bool(model.mid_attn),
      head_dim=int(model.head_dim),
      ff_mult=int(model.ff_mult),
      text_dim=int(model.text_dim),
      cond_dim=int(model.cond_dim),
      emb_dim=int(model.emb_dim) or None,
      in_channels=int(model.in_channels),
      lowres_cond=bool(model.lowres_cond),
      lowres_resize=str(model.lowres_resize),
      num_groups=int(model.num_groups),
      dropout=float(model.dropout),
      dtype=str(model.dtype),
      remat=str(model.remat),
      out_channels=int(model.get("out_channels", 0)) or None,
      family=str(model.get("family", "imagen")),
      res_scale=float(model.get("res_scale", 1.0)),
      mid_scale=float(model.get("mid_scale", 1.0)),
      emb_act=bool(model.get("emb_act", False)),
      skip_time_act=bool(model.get("skip_time_act", False)),
      pool_heads=int(model.get("pool_heads", 64)),
  )


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


def count_params(params: Any) -> int:
  """Number of scalars in a (possibly boxed or abstract) param tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.unbox(params)))
