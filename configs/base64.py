"""Imagen base stage: 64x64 text-conditioned U-Net (~2.0B params).

Paper (App. F): embed dim 512, channel mult [1, 2, 3, 4], 3 res blocks per
level, self- and cross-attention at 32, 16 and 8, 64 channels per head, text
from T5-XXL (width 4096).

Variants (``--config=configs/base64.py:VARIANT``):
  paper  the paper's model (default)
  cpu    a CPU-scale model (32x32) for benchmarks
  tiny   a toy model that runs in tests in seconds

Parameter count and forward FLOPs (no memory is allocated):
  python -m imagen_jax.tools.param_count --config=configs/base64.py
"""

from imagen_jax import config_defaults


def get_config(arg: str = "paper"):
  """Returns the config of the base stage; ``arg`` picks the variant."""
  config = config_defaults.base()
  config.resolution = 64
  m = config.model
  m.base_channels = 512
  m.channel_mult = (1, 2, 3, 4)
  m.num_res_blocks = (3, 3, 3, 3)
  m.self_attn = (False, True, True, True)
  m.cross_attn = (False, True, True, True)
  m.head_dim = 64
  m.text_dim = 4096
  m.cond_dim = 512
  if arg == "cpu":
    config.resolution = 32
    m.base_channels = 64
    m.channel_mult = (1, 2, 3)
    m.num_res_blocks = (2, 2, 2)
    m.self_attn = (False, True, True)
    m.cross_attn = (False, True, True)
    m.head_dim = 64
    m.text_dim = 256
    m.cond_dim = 128
    m.dtype = "float32"
    config_defaults.use_random_t5(config, "demo", max_length=32)
  elif arg == "tiny":
    config.resolution = 16
    m.base_channels = 16
    m.channel_mult = (1, 2)
    m.num_res_blocks = (1, 1)
    m.self_attn = (False, True)
    m.cross_attn = (False, True)
    m.head_dim = 16
    m.text_dim = 32
    m.cond_dim = 32
    m.num_groups = 8
    m.dtype = "float32"
    config_defaults.use_random_t5(config, "tiny", max_length=16)
  elif arg != "paper":
    raise ValueError(f"Unknown variant {arg!r} of base64.py; choose paper, cpu "
                     "or tiny.")
  return config

