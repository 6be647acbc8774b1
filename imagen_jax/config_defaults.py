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
      num_examples=0,      # built-in datasets: how many to render
      holdout="",          # shapes: attribute combinations held out of train
      store="",            # embedding store dir (default: WORKDIR/embeddings)
  ))


def embed_defaults() -> ml_collections.ConfigDict:
  """The embed job: batch size, shard size, local mesh."""
  return ml_collections.ConfigDict(dict(
      batch_size=128,
      shard_size=4096,     # examples per shard; a multiple of batch_size
      mesh_shape=(1, -1, 1),  # over this process's devices
  ))


def base() -> ml_collections.ConfigDict:
  """Defaults shared by every stage and experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
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
