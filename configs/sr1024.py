"""Imagen super-resolution stage 256 -> 1024: Efficient U-Net (~400M params).

Paper (App. B, F): the 64 -> 256 Efficient U-Net without self-attention,
keeping text cross-attention at the lowest resolution; trained on 256x256
crops of the 1024 image (with the matching 64x64 crops of the 256 input), so
it is fully convolutional at sampling time. Paper schedule: linear.

Variants (``--config=configs/sr1024.py:VARIANT``): paper (default), cpu
(64 -> 256 on 64 crops), tiny (16 -> 64 on 32 crops, tests).

  python -m imagen_jax.tools.param_count --config=configs/sr1024.py
"""

from imagen_jax import config_defaults


def get_config(arg: str = "paper"):
  """Returns the config of the 256 -> 1024 stage; ``arg`` picks the variant."""
  config = config_defaults.base()
  config.resolution = 1024
  config.lowres_resolution = 256
  config.train_crop = 256
  m = config.model
  m.efficient = True
  m.lowres_cond = True
  m.base_channels = 128
  m.channel_mult = (1, 2, 4, 8)
  m.num_res_blocks = (2, 4, 8, 8)
  m.self_attn = (False, False, False, False)
  m.cross_attn = (False, False, False, True)
  m.head_dim = 64
  m.text_dim = 4096
  m.cond_dim = 512
  if arg == "cpu":
    config.resolution = 256
    config.lowres_resolution = 64
    config.train_crop = 64
    m.base_channels = 16
    m.channel_mult = (1, 2, 4)
    m.num_res_blocks = (1, 2, 2)
    m.cross_attn = (False, False, True)
    m.self_attn = (False, False, False)
    m.head_dim = 64
    m.text_dim = 256
    m.cond_dim = 128
    m.num_groups = 8
    m.dtype = "float32"
    config_defaults.use_random_t5(config, "demo", max_length=32)
  elif arg == "tiny":
    config.resolution = 64
    config.lowres_resolution = 16
    config.train_crop = 32
    m.base_channels = 8
    m.channel_mult = (1, 2)
    m.num_res_blocks = (1, 1)
    m.self_attn = (False, False)
    m.cross_attn = (False, True)
    m.head_dim = 8
    m.text_dim = 32
    m.cond_dim = 32
    m.num_groups = 4
    m.dtype = "float32"
    config_defaults.use_random_t5(config, "tiny", max_length=16)
  elif arg != "paper":
    raise ValueError(f"Unknown variant {arg!r} of sr1024.py; choose paper, cpu "
                     "or tiny.")
  return config

