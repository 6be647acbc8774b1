"""imagen_jax: Imagen-style cascaded text-to-image diffusion in JAX/Flax."""

__version__ = "0.1.0"
