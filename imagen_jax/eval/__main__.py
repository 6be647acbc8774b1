"""python -m imagen_jax.eval"""
from imagen_jax.eval.main import run_main

run_main()
