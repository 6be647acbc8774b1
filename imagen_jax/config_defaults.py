"""The full config schema with defaults; experiment files in configs/ override.

Every key a user can set with ``--config.x=y`` exists here, so an unknown key
is an error rather than a silent no-op. Experiment files call ``base()`` and
change what they need.
"""

from __future__ import annotations

import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
  """U-Net settings (fields of ``imagen_jax.models.UNet``)."""
  return ml_collections.ConfigDict(dict(
      base_channels=128,
      channel_mult=(1, 2, 4, 8),
      num_res_blocks=(2, 2, 2, 2),
      self_attn=(False, False, False, False),
      cross_attn=(False, False, False, False),
      efficient=False,
      mid_attn=True,
      head_dim=64,
      ff_mult=0,
      text_dim=4096,
      cond_dim=512,
      emb_dim=0,            # 0: 4 x base_channels
      in_channels=3,
      lowres_cond=False,
      lowres_resize="bilinear",
      num_groups=32,
      dropout=0.0,
      dtype="bfloat16",
      remat="none",
      out_channels=0,       # 0: in_channels (IF: 6, eps + learned variance)
      family="imagen",      # imagen | if (DeepFloyd IF's blocks)
      res_scale=1.0,        # IF: res block output divisor
      mid_scale=1.0,        # IF: middle res blocks' output divisor
      emb_act=False,        # IF-II: GELU on the summed embedding
      skip_time_act=False,  # IF-II: no GELU before res blocks' projection
      pool_heads=64,        # IF: text attention-pooling heads
  ))


def text_defaults() -> ml_collections.ConfigDict:
  """Frozen text encoder: which T5, whose weights, which vocabulary."""
  return ml_collections.ConfigDict(dict(
      t5="xxl",            # small | base | large | xl | xxl | demo | tiny
      source="t5x",        # t5x | hf | random
      checkpoint="",       # t5x checkpoint dir or Hugging Face dir
      vocab="",            # SentencePiece .model ("default": the demo vocab)
      max_length=128,      # tokens per caption incl. EOS (the paper's)
      seed=0,              # init seed when source == "random"
      random_init="t5",    # source == "random": t5 | local (text/encoder.py)
      dtype="bfloat16",    # encoder compute dtype
  ))


def data_defaults() -> ml_collections.ConfigDict:
  """Caption/image source and the embedding store built from it."""
  return ml_collections.ConfigDict(dict(
      source="tfds",       # tfds | shapes | digits | tfrecord | folder | webdataset
      name="coco_captions",  # tfds name
      split="train",
      data_dir="",         # tfds data dir
      image_key="image",
      caption_key="captions/text",
      id_key="",
      files="",            # glob (tfrecord, webdataset); "split:glob,..." allowed
      folder="",           # image folder with .txt captions
      num_examples=0,      # built-in datasets: training examples to render
      num_test=500,        # shapes: test (and holdout) examples
      render_resolution=128,  # built-in datasets: size they are rendered at
      render_seed=0,       # shapes: scene seed
      holdout="",          # shapes: "red triangle,blue circle" held out of train
      store="",            # embedding store dir (default: WORKDIR/embeddings)
      min_size=0,          # drop images whose shorter side is smaller (0: resolution)
      flip=False,          # random horizontal flips (off: captions say left/right)
  ))


def embed_defaults() -> ml_collections.ConfigDict:
  """The embed job: batch size, shard size, local mesh."""
  return ml_collections.ConfigDict(dict(
      batch_size=128,
      shard_size=4096,     # examples per shard; a multiple of batch_size
      mesh_shape=(1, -1, 1),  # over this process's devices
  ))


def diffusion_defaults() -> ml_collections.ConfigDict:
  """Diffusion settings of a stage (see ``imagen_jax.stage.Stage``)."""
  return ml_collections.ConfigDict(dict(
      schedule="cosine",
      schedule_shift=1.0,
      prediction="eps",
      weighting="none",
      min_snr_gamma=5.0,
      cond_drop_prob=0.1,   # the paper's 10% null-text steps
      aug_schedule="cosine",
      aug_max=1.0,          # SR: training aug levels ~ U[0, aug_max]
      sr_target="image",    # SR: image (paper) | residual over the upsampled input
  ))


def optimizer_defaults() -> ml_collections.ConfigDict:
  """Optimizer and learning-rate schedule."""
  return ml_collections.ConfigDict(dict(
      name="adam",          # adafactor | adam | adamw
      learning_rate=1e-4,
      warmup_steps=10000,
      decay="cosine",       # cosine | linear | constant (after warmup)
      decay_steps=0,        # 0: total_steps - warmup_steps
      end_lr_factor=0.0,    # final lr = end_lr_factor * learning_rate
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,        # global-norm clip; 0 disables
      grad_accum=1,         # micro-batches per step (one update per step)
  ))


def sample_defaults() -> ml_collections.ConfigDict:
  """Sampling settings: periodic samples in training, and the cascade."""
  return ml_collections.ConfigDict(dict(
      sampler="ddim",
      num_steps=50,
      guidance_scale=5.0,
      threshold="dynamic",
      percentile=99.5,
      aug_level=0.2,        # SR stages: fixed noise-augmentation level
      eta=0.0,
  ))


def base() -> ml_collections.ConfigDict:
  """Defaults shared by every stage and experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100000
  config.batch_size = 64          # global, over all processes
  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3      # orbax max_to_keep
  config.keep_period = 0           # also keep every N-th step forever (0: off)
  config.async_checkpoints = True
  config.sample_every = 5000       # periodic sample grid (0: off)
  config.num_samples = 8
  config.init_from = ""            # params (EMA) of another run to start from
  config.max_consecutive_skips = 20  # non-finite steps in a row before stopping
  config.peak_flops = 0.0          # per device, for MFU (0: table / measured)
  config.loss_buckets = 4          # per-noise-level loss, in t buckets
  config.prefetch = 2              # host batches prepared ahead
  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),            # (data, fsdp, tensor); -1 takes the rest
      dcn_shape=(1, 1, 1),         # multi-slice: slices along each axis
      num_devices=0,               # single process: use the first N devices (0: all)
  ))
  config.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=True))
  config.diffusion = diffusion_defaults()
  config.optimizer = optimizer_defaults()
  config.sample = sample_defaults()
  # Stage geometry: the image size the stage produces, the size of its
  # low-res input (0 for the base stage) and, for stages trained on crops
  # (Imagen's 1024 stage: 256 crops of the 1024 image), the crop size.
  config.resolution = 64
  config.lowres_resolution = 0
  config.train_crop = 0
  config.model = model_defaults()
  config.text = text_defaults()
  config.data = data_defaults()
  config.embed = embed_defaults()
  return config


def use_tiny_unet(config: ml_collections.ConfigDict,
                  num_res_blocks: tuple = (1, 1)) -> None:
  """A ~0.1-0.2M-param U-Net (2 levels, attention at the lower one) for tests.

  Float32 compute and 32-wide text input: pair it with the "tiny" T5.
  """
  m = config.model
  m.base_channels = 16
  m.channel_mult = (1, 2)
  m.num_res_blocks = tuple(num_res_blocks)
  m.self_attn = (False, True)
  m.cross_attn = (False, True)
  m.head_dim = 16
  m.text_dim = 32
  m.cond_dim = 32
  m.num_groups = 8
  m.dtype = "float32"


def use_random_t5(config: ml_collections.ConfigDict, size: str,
                  max_length: int) -> None:
  """Points ``config.text`` at a random-weight T5 with the demo vocabulary.

  For CPU-scale and test variants: nothing is downloaded, and the weights are
  a pure function of ``config.text.seed``.
  """
  config.text.t5 = size
  config.text.source = "random"
  config.text.vocab = "default"
  config.text.max_length = max_length
  config.text.dtype = "float32"


def use_paper_training(config: ml_collections.ConfigDict, optimizer: str,
                       fsdp: int) -> None:
  """Imagen's training recipe (App. F) on a TPU pod slice.

  Batch 2048, lr 1e-4 with 10k linear warmup steps and cosine decay over
  2.5M steps, EMA 0.9999; Adafactor for the base stage, Adam (0.9, 0.999,
  1e-8) for the super-resolution stages. Frozen T5-XXL from its t5x
  checkpoint. Params and optimizer state are FSDP-sharded ``fsdp`` ways.
  """
  config.total_steps = 2_500_000
  config.batch_size = 2048
  config.log_every = 100
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.keep_period = 100_000
  config.sample_every = 20_000
  config.mesh.shape = (-1, fsdp, 1)
  o = config.optimizer
  o.name = optimizer
  o.learning_rate = 1e-4
  o.warmup_steps = 10_000
  o.decay = "cosine"
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.grad_clip = 1.0
  config.ema.decay = 0.9999
  config.model.dtype = "bfloat16"
  t = config.text
  t.t5 = "xxl"
  t.source = "t5x"
  t.checkpoint = "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000"
  t.vocab = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
  t.max_length = 128
  t.dtype = "bfloat16"
  config.embed.batch_size = 1024
  config.embed.shard_size = 65536


def use_cpu_training(config: ml_collections.ConfigDict, steps: int,
                     batch: int, lr: float) -> None:
  """Training settings that fit a 2-core CPU (benchmarks, the demo)."""
  config.total_steps = steps
  config.batch_size = batch
  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.sample_every = 0
  config.mesh.shape = (-1, 1, 1)
  o = config.optimizer
  o.name = "adam"
  o.learning_rate = lr
  o.warmup_steps = max(steps // 20, 1)
  o.decay = "cosine"
  o.end_lr_factor = 0.1
  config.ema.decay = 0.995
  config.embed.batch_size = 64
  config.embed.shard_size = 1024
