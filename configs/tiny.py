"""A tiny base stage on synthetic data: trains in seconds on a CPU.

Used by the tests and by anyone checking an install:

  imagen-train --config=configs/tiny.py --workdir=/tmp/imagen-tiny

16x16 images of one coloured square ("a large red square") with captions
encoded by a tiny random-weight T5 (no download); ~220k params. Expected cost:
about 1-2 minutes for 200 steps on 2 CPU cores, most of it compilation.
"""

from imagen_jax import config_defaults


def get_config(arg: str = ""):
  """The tiny config; ``arg`` is unused (kept for ``--config=...:arg``)."""
  del arg
  config = config_defaults.base()
  config.resolution = 16
  config_defaults.use_tiny_unet(config)
  config_defaults.use_random_t5(config, "tiny", max_length=16)
  config.data.source = "synthetic"
  config.total_steps = 200
  config.batch_size = 16
  config.log_every = 50
  config.checkpoint_every = 100
  config.keep_checkpoints = 2
  config.sample_every = 0
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 20
  config.ema.decay = 0.99
  config.sample.num_steps = 20
  config.sample.guidance_scale = 3.0
  return config
