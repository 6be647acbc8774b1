"""The embedded default (``imagen-demo``): see ``imagen_jax/demo_config.py``.

  imagen-demo --workdir=/tmp/demo --config=configs/demo.py:digits
"""

from imagen_jax.demo_config import get_config  # noqa: F401  (re-exported)
