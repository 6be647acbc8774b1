"""Flax modules: the U-Net family and the T5 encoder. No diffusion, no configs."""

from imagen_jax.models.unet import UNet

__all__ = ["UNet"]
