"""imagen_jax: Imagen-style cascaded text-to-image diffusion in JAX/Flax."""

from imagen_jax import xla_flags as _xla_flags

_xla_flags.apply()

__version__ = "0.1.0"
