"""Imagen super-resolution stage 64 -> 256: Efficient U-Net (~600M params).

Paper (App. B, F): channels 128/256/512/1024 with 2/4/8/8 res blocks per
level; downsample before / upsample after the block convolutions; skips
scaled by 1/sqrt(2); self-attention and text cross-attention at the lowest
resolution only; noise conditioning augmentation of the 64x64 input.

Training (paper): Adam (0.9, 0.999, 1e-8), lr 1e-4, 10k warmup, batch 2048;
aug levels ~ U[0, 1] in training, 0.2 at sampling (0.1-0.3 is best).

Variants (``--config=configs/sr256.py:VARIANT``): paper (default), cpu
(16 -> 64), tiny (8 -> 32, tests).

cpu variant: 64/128/256 channels (10.5M params); step times are in
benchmarks/RESULTS.md. Its base width is 64, as in base64:cpu, because at 32
channels XLA:CPU's convolutions on the 64x64 maps run well below the
machine's matmul speed and elementwise work dominates (measured there).

Launch (paper, after the shared embed pass):
  launch/tpu_pod.sh --tpu=imagen-v4-512 --zone=us-central2-b -- \
    imagen-train --config=configs/sr256.py --workdir=gs://BUCKET/sr256 \
    --config.data.store=gs://BUCKET/base64/embeddings
Expected cost (paper): 0.57 TFLOP per example forward at 256x256, ~1.7 TFLOP
per example per step, ~9e21 FLOP for 2.5M steps at batch 2048: about 1.5
days on 512 TPU v4 chips at 50% MFU.

  python -m imagen_jax.tools.param_count --config=configs/sr256.py
"""

from imagen_jax import config_defaults


def get_config(arg: str = "paper"):
  """Returns the config of the 64 -> 256 stage; ``arg`` picks the variant."""
  config = config_defaults.base()
  config.resolution = 256
  config.lowres_resolution = 64
  m = config.model
  m.efficient = True
  m.lowres_cond = True
  m.base_channels = 128
  m.channel_mult = (1, 2, 4, 8)
  m.num_res_blocks = (2, 4, 8, 8)
  m.self_attn = (False, False, False, True)
  m.cross_attn = (False, False, False, True)
  m.ff_mult = 2
  m.head_dim = 64
  m.text_dim = 4096
  m.cond_dim = 512
  config_defaults.use_paper_training(config, "adam", fsdp=4)
  config.sample.sampler = "ancestral"
  config.sample.num_steps = 256
  config.sample.guidance_scale = 8.0   # the paper's COCO FID-30K setting
  config.sample.aug_level = 0.2
  if arg == "cpu":
    config.resolution = 64
    config.lowres_resolution = 16
    m.base_channels = 64
    m.channel_mult = (1, 2, 4)
    m.num_res_blocks = (1, 2, 2)
    m.self_attn = (False, False, True)
    m.cross_attn = (False, False, True)
    m.head_dim = 64
    m.text_dim = 256
    m.cond_dim = 128
    m.num_groups = 16
    m.dtype = "float32"
    config_defaults.use_random_t5(config, "demo", max_length=32)
    config_defaults.use_cpu_training(config, steps=1500, batch=16, lr=5e-4)
    config.sample.sampler = "dpmpp_2m"
    config.sample.num_steps = 20
    config.sample.guidance_scale = 1.0
  elif arg == "tiny":
    config.resolution = 32
    config.lowres_resolution = 8
    config_defaults.use_tiny_unet(config, num_res_blocks=(1, 2))
    config_defaults.use_random_t5(config, "tiny", max_length=16)
    config_defaults.use_cpu_training(config, steps=100, batch=8, lr=2e-3)
    config.sample.sampler = "ddim"
    config.sample.num_steps = 10
    config.sample.guidance_scale = 1.0
  elif arg != "paper":
    raise ValueError(f"Unknown variant {arg!r} of sr256.py; choose paper, cpu "
                     "or tiny.")
  return config

