"""``python -m imagen_jax.train`` = ``imagen-train``."""

from imagen_jax.train.main import run_main

run_main()
