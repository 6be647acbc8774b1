"""Imagen super-resolution stage 256 -> 1024: Efficient U-Net (~400M params).

Paper (App. B, F): the 64 -> 256 Efficient U-Net without self-attention,
keeping text cross-attention at the lowest resolution; trained on 256x256
crops of the 1024 image (with the matching 64x64 crops of the 256 input), so
it is fully convolutional at sampling time. Paper schedule: linear.

Training (paper): Adam, lr 1e-4, 10k warmup, batch 2048, linear log-SNR
schedule; noise conditioning augmentation as for the 256 stage.

Variants (``--config=configs/sr1024.py:VARIANT``): paper (default), cpu
(64 -> 256 on 64 crops), tiny (16 -> 64 on 32 crops, tests).

Launch (paper):
  launch/tpu_pod.sh --tpu=imagen-v4-512 --zone=us-central2-b -- \
    imagen-train --config=configs/sr1024.py --workdir=gs://BUCKET/sr1024 \
    --config.data.store=gs://BUCKET/base64/embeddings
Expected cost (paper): training runs on 256 crops: ~0.5 TFLOP per example
forward (8.2 TFLOP at the full 1024 sampling size), ~1.5 TFLOP per example
per step: about 1.3 days for 2.5M steps on 512 TPU v4 chips at 50% MFU.

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
  config_defaults.use_paper_training(config, "adam", fsdp=4)
  config.diffusion.schedule = "linear"
  config.sample.sampler = "ancestral"
  config.sample.num_steps = 256
  config.sample.guidance_scale = 8.0
  config.sample.aug_level = 0.2
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
    config_defaults.use_cpu_training(config, steps=1000, batch=8, lr=5e-4)
    config.sample.sampler = "dpmpp_2m"
    config.sample.num_steps = 20
    config.sample.guidance_scale = 1.0
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
    config_defaults.use_cpu_training(config, steps=100, batch=8, lr=2e-3)
    config.sample.sampler = "ddim"
    config.sample.num_steps = 10
    config.sample.guidance_scale = 1.0
  elif arg != "paper":
    raise ValueError(f"Unknown variant {arg!r} of sr1024.py; choose paper, cpu "
                     "or tiny.")
  return config

