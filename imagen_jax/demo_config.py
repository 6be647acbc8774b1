"""The embedded default: a two-stage cascade on the built-in datasets.

``imagen-demo --workdir=DIR`` runs it (``configs/demo.py`` is the same file for
``--config=configs/demo.py:VARIANT``). Variants:

  shapes (default)  32x32 base + 32 -> 64 SR, both Efficient U-Nets, on
                    ``shapes`` (10k rendered scenes, "red triangle" and "blue
                    circle" held out of training); ~20 minutes on 2 CPU cores.
  digits            the same cascade on scikit-learn's handwritten digits.
  quick             a 1-2 minute version for the test suite (tiny nets, few
                    steps; its scores mean nothing).

The frozen text encoder is a *random-weight* T5 ("demo" size: d_model 256,
4 layers) with the project's 1024-piece SentencePiece vocabulary: no
pretrained weights can ship with the package. Its embeddings still carry
each token's identity through fixed random projections, which is all a
closed-vocabulary caption grammar needs. For real T5 weights set e.g.

  --config.text.t5=xxl --config.text.source=t5x \
  --config.text.checkpoint=gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000 \
  --config.text.vocab=gs://t5-data/vocabs/cc_all.32000/sentencepiece.model

(or ``--config.text.source=hf --config.text.checkpoint=DIR`` for a Hugging
Face T5 directory); the stages' ``model.text_dim`` follows the encoder.

Layout: ``config.data`` and ``config.text`` are shared by both stages;
``config.base`` and ``config.sr`` are ordinary stage configs (their own data
and text sections are overwritten with the shared ones); ``config.eval`` is
the prompt suite and the sampling settings of the final evaluation.
"""

from __future__ import annotations

import ml_collections

from imagen_jax import config_defaults

VARIANTS = ("shapes", "digits", "quick")


def _base_stage(text_dim: int) -> ml_collections.ConfigDict:
  """32x32 text-conditioned Efficient U-Net (levels at 16, 8 and 4 px).

  32 px, not 16: squeezed through 16 px and interpolated back, the ground
  truth itself scores 0.74 all-correct on the suite (shapes of 3-8 px
  objects are lost); through 32 px it scores 1.00 (benchmarks/RESULTS.md).
  The Efficient U-Net layout (downsample before the convolutions) makes a
  step several times cheaper than the standard layout at the same widths,
  and what the base must learn here (layout, binding of colour, shape and
  relation) is decided at low resolution: in the same minutes, more steps
  of this network bind relations that the standard one leaves at chance.
  The efficient layout alone reaches the output only through 16 px
  features, and draws squares with dented sides that the SR stage sharpens
  into circles; the full-resolution skip fixes the edges
  (benchmarks/RESULTS.md).
  """
  c = config_defaults.base()
  c.resolution = 32
  m = c.model
  m.efficient = True
  m.base_channels = 32
  m.channel_mult = (1, 2, 4)
  m.num_res_blocks = (1, 2, 2)
  m.self_attn = (False, True, True)
  m.cross_attn = (False, True, True)
  m.head_dim = 32
  m.text_dim = text_dim
  m.cond_dim = 256
  m.full_res_skip = True
  m.dtype = "float32"
  config_defaults.use_cpu_training(c, steps=3600, batch=32, lr=1e-3)
  c.diffusion.schedule = "cosine"
  # v-prediction (Salimans & Ho 2022; Imagen Video): its x0 estimate stays
  # bounded at the first sampling steps, where eps-prediction divides the
  # network's error by alpha ~ 5e-5 (log-SNR -20). A small CPU-trained eps
  # model gets a wrong image mean from that first step; see README.
  c.diffusion.prediction = "v"
  c.sample.sampler = "ddim"
  c.sample.num_steps = 50
  c.sample.guidance_scale = 3.0
  # Most pixels of these scenes are black (-1): dynamic thresholding's
  # s > 1 then greys the whole background (see README).
  c.sample.threshold = "static"
  return c


def _sr_stage(text_dim: int) -> ml_collections.ConfigDict:
  """Efficient U-Net x2 SR, 32 -> 64, noise conditioning augmentation,
  residual target, trained on 32 px crops (as Imagen's 1024 stage is)."""
  c = config_defaults.base()
  c.resolution = 64
  c.lowres_resolution = 32
  c.train_crop = 32
  m = c.model
  m.efficient = True
  m.lowres_cond = True
  m.base_channels = 32
  m.channel_mult = (1, 2, 4)
  m.num_res_blocks = (1, 2, 2)
  m.self_attn = (False, False, True)
  m.cross_attn = (False, False, True)
  m.head_dim = 32
  m.text_dim = text_dim
  m.cond_dim = 128
  m.num_groups = 16
  m.dtype = "float32"
  config_defaults.use_cpu_training(c, steps=1200, batch=16, lr=1e-3)
  c.diffusion.prediction = "v"
  c.diffusion.aug_max = 0.5
  c.diffusion.sr_target = "residual"
  c.sample.sampler = "ddim"
  c.sample.num_steps = 25
  c.sample.guidance_scale = 1.0
  c.sample.aug_level = 0.1
  c.sample.threshold = "static"
  return c


def get_config(arg: str = "shapes") -> ml_collections.ConfigDict:
  """The demo config; ``arg`` picks the variant (see the module doc)."""
  arg = arg or "shapes"
  if arg not in VARIANTS:
    raise ValueError(f"Unknown demo variant {arg!r}; choose one of {VARIANTS}.")
  config = ml_collections.ConfigDict()
  config.variant = arg
  text = config_defaults.text_defaults()
  text.t5, text.source, text.vocab = "demo", "random", "default"
  # Word order and binding must survive the frozen random encoder for
  # relations ("a red circle to the left of a blue square") to be learnable.
  text.random_init = "local"
  text.max_length = 24
  text.dtype = "float32"
  config.text = text
  data = config_defaults.data_defaults()
  data.source = "digits" if arg == "digits" else "shapes"
  data.split = "train"
  data.num_examples = 10000
  data.num_test = 200
  data.render_resolution = 64
  data.holdout = "" if arg == "digits" else "red triangle,blue circle"
  config.data = data
  config.embed = config_defaults.embed_defaults()
  config.embed.batch_size = 128
  config.embed.shard_size = 2048
  config.embed.mesh_shape = (1, -1, 1)
  config.base = _base_stage(256)
  config.sr = _sr_stage(256)
  config.eval = ml_collections.ConfigDict(dict(
      seed=0,
      per_category=24,     # prompts per suite category (shapes) or per digit
      num_samples=1,       # images per prompt
      batch_size=64,       # prompts sampled at once
  ))
  if arg == "digits":
    config.data.num_examples = 0   # digits: the fixed training split
    config.eval.per_category = 10     # prompts per digit
  if arg == "quick":
    text.t5 = "tiny"
    data.num_examples = 256
    data.num_test = 16
    data.render_resolution = 32
    config.embed.batch_size = 64
    config.embed.shard_size = 128
    for c, steps in ((config.base, 30), (config.sr, 20)):
      config_defaults.use_tiny_unet(c)
      c.total_steps = steps
      c.batch_size = 8
      c.log_every = 10
      c.checkpoint_every = steps // 2
      c.optimizer.warmup_steps = 2
      c.sample.num_steps = 4
    config.sr.resolution = 32
    config.sr.lowres_resolution = 8
    config.base.resolution = 8
    config.eval.per_category = 2
  return config
