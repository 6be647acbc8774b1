"""Imagen base stage: 64x64 text-conditioned U-Net (~2.0B params).

Paper (App. F): embed dim 512, channel mult [1, 2, 3, 4], 3 res blocks per
level, self- and cross-attention at 32, 16 and 8, 64 channels per head, text
from T5-XXL (width 4096). Adafactor, lr 1e-4, 10k warmup, cosine decay,
batch 2048, 2.5M steps; classifier-free guidance with 10% null text.

Variants (``--config=configs/base64.py:VARIANT``):
  paper  the paper's model and recipe (default)
  cpu    a CPU-scale model (32x32) for benchmarks and the demo
  tiny   a toy model that runs in tests in seconds

Launch (paper): embed COCO/LAION-style captions once, then train on a TPU pod
  launch/tpu_pod.sh --tpu=imagen-v4-512 --zone=us-central2-b -- \
    imagen-embed --config=configs/base64.py --workdir=gs://BUCKET/base64
  launch/tpu_pod.sh --tpu=imagen-v4-512 --zone=us-central2-b -- \
    imagen-train --config=configs/base64.py --workdir=gs://BUCKET/base64
Expected cost (paper): 1.33 TFLOP per example forward (param_count tool), so
~4 TFLOP per example per step, ~8.2 PFLOP per step at batch 2048 and ~2e22
FLOP for 2.5M steps: about 3.5 days on 512 TPU v4 chips at 50% MFU. The T5-XXL
embed pass costs 1.2 TFLOP per caption, once.
cpu variant: step times on 2 CPU cores are in benchmarks/RESULTS.md.

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
  config_defaults.use_paper_training(config, "adafactor", fsdp=8)
  config.sample.sampler = "ancestral"
  config.sample.num_steps = 256
  config.sample.guidance_scale = 1.35  # the paper's COCO FID-30K setting
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
    config_defaults.use_cpu_training(config, steps=2000, batch=32, lr=5e-4)
    config.sample.sampler = "dpmpp_2m"
    config.sample.num_steps = 25
    config.sample.guidance_scale = 3.0
  elif arg == "tiny":
    config.resolution = 16
    config_defaults.use_tiny_unet(config)
    config_defaults.use_random_t5(config, "tiny", max_length=16)
    config_defaults.use_cpu_training(config, steps=200, batch=16, lr=2e-3)
    config.sample.sampler = "ddim"
    config.sample.num_steps = 20
    config.sample.guidance_scale = 3.0
  elif arg != "paper":
    raise ValueError(f"Unknown variant {arg!r} of base64.py; choose paper, cpu "
                     "or tiny.")
  return config

