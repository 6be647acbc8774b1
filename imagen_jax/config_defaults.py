"""The full config schema with defaults; experiment files in configs/ override.

Every key a user can set with ``--config.x=y`` exists here, so an unknown key
is an error rather than a silent no-op. Experiment files call ``base()`` and
change what they need.
"""

from __future__ import annotations

import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
  """U-Net settings (fields of ``imagen_jax.models.UNet``)."""
  return ml_collections.ConfigDict(dict(
      base_channels=128,
      channel_mult=(1, 2, 4, 8),
      num_res_blocks=(2, 2, 2, 2),
      self_attn=(False, False, False, False),
      cross_attn=(False, False, False, False),
      efficient=False,
      mid_attn=True,
      head_dim=64,
      ff_mult=0,
      text_dim=4096,
      cond_dim=512,
      emb_dim=0,            # 0: 4 x base_channels
      in_channels=3,
      lowres_cond=False,
      lowres_resize="bilinear",
      num_groups=32,
      dropout=0.0,
      dtype="bfloat16",
      remat="none",
  ))


def base() -> ml_collections.ConfigDict:
  """Defaults shared by every stage and experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Stage geometry: the image size the stage produces, the size of its
  # low-res input (0 for the base stage) and, for stages trained on crops
  # (Imagen's 1024 stage: 256 crops of the 1024 image), the crop size.
  config.resolution = 64
  config.lowres_resolution = 0
  config.train_crop = 0
  config.model = model_defaults()
  return config
