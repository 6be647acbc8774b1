"""One diffusion stage: a U-Net bound to the diffusion math (loss, sample).

As t5x's ``EncoderDecoderModel`` owns the loss and decoding of a
``network.Transformer``, a ``Stage`` owns the training loss and the sampling
loop of a ``UNet``: classifier-free-guidance text dropout, noise conditioning
augmentation of the low-res input (SR stages), aligned random crops (stages
trained on crops), and guided, thresholded sampling.

Batches reaching ``loss`` (all batch-major, ``B`` examples):

  image      uint8 ``[B, H, W, C]`` (or float in [-1, 1])
  text       ``[B, L, D]`` T5 embeddings (zeros past each caption's length)
  text_mask  bool ``[B, L]``
  lowres     SR stages: uint8 ``[B, h, w, C]``, the image downsampled by the
             stage factor (before augmentation)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax import build
from imagen_jax import config_defaults
from imagen_jax import diffusion
from imagen_jax.config_defaults import StageSettings  # noqa: F401  (re-exported)
from imagen_jax.diffusion import discrete
from imagen_jax.models import if_blocks
from imagen_jax.models.unet import UNet


def to_float_image(x: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]; floats pass through as float32."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)


def to_uint8_image(x: jax.Array) -> jax.Array:
  """float [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def random_aligned_crop(image: jax.Array, lowres: Optional[jax.Array],
                        crop: int, rng: jax.Array):
  """Random ``crop`` x ``crop`` crops of ``image``, with the matching low-res crop.

  The low-res crop covers exactly the same region: its offset and size are
  the high-res ones divided by the stage factor, so offsets are drawn on the
  low-res grid. Each example gets its own offset.

  Args:
    image: ``[B, H, W, C]``.
    lowres: ``[B, H / f, W / f, C]`` or None.
    crop: crop size at image resolution (divisible by f).
    rng: PRNG key.

  Returns:
    (image crops ``[B, crop, crop, C]``, low-res crops or None).
  """
  b, h, w, _ = image.shape
  f = 1 if lowres is None else h // lowres.shape[1]
  lc = crop // f
  ky, kx = jax.random.split(rng)
  oy = jax.random.randint(ky, (b,), 0, h // f - lc + 1)
  ox = jax.random.randint(kx, (b,), 0, w // f - lc + 1)

  def one(img, y, x, size, scale):
    return jax.lax.dynamic_slice(img, (y * scale, x * scale, 0),
                                 (size, size, img.shape[-1]))

  hi = jax.vmap(lambda i, y, x: one(i, y, x, crop, f))(image, oy, ox)
  lo = None if lowres is None else jax.vmap(
      lambda i, y, x: one(i, y, x, lc, 1))(lowres, oy, ox)
  return hi, lo


SR_TARGETS = config_defaults.SR_TARGETS


def check_sr_target(sr_target: str) -> None:
  """Raises a one-line ValueError for an unknown ``diffusion.sr_target``."""
  if sr_target not in SR_TARGETS:
    raise ValueError(f"Unknown diffusion.sr_target {sr_target!r}; choose one "
                     f"of {', '.join(SR_TARGETS)}.")


@flax.struct.dataclass
class SampleInputs:
  """What one stage samples from, for a batch of B examples (a pytree).

  Attributes:
    text: ``[B, L, D]`` text embeddings.
    text_mask: ``[B, L]`` bool, True for real tokens.
    lowres: SR stages only: ``[B, h, w, C]`` low-res images (uint8, or
      floats in [-1, 1]).
    negative_text: ``[B, L, D]``: guide away from this text instead of the
      null text; with ``negative_mask`` ``[B, L]``.
    negative_mask: see ``negative_text``.
    init_image: ``[B, R, R, C]``: start from this image noised to the
      sampler's ``start_logsnr`` instead of from noise (img2img).
  """
  text: jax.Array
  text_mask: jax.Array
  lowres: Optional[jax.Array] = None
  negative_text: Optional[jax.Array] = None
  negative_mask: Optional[jax.Array] = None
  init_image: Optional[jax.Array] = None


def _diffusion_default(name: str):
  """A diffusion field's default, from its declaration in config_defaults."""
  return config_defaults.DIFFUSION[name].default


@dataclasses.dataclass(frozen=True)
class Stage:
  """A U-Net and the diffusion settings of one cascade stage.

  Attributes:
    unet: the network.
    resolution: output resolution at sampling time.
    lowres_resolution: resolution of the low-res input (0 for the base stage).
    train_crop: crop size used in training (0: whole images).
    schedule: log-SNR schedule name; schedule_shift its resolution shift.
    prediction: "eps" (paper), "x0" or "v".
    weighting: loss weighting ("none", "min_snr", "v").
    min_snr_gamma: gamma of min-SNR weighting.
    cond_drop_prob: fraction of examples trained on the null text.
    aug_schedule: schedule interpreting noise-augmentation levels.
    aug_max: training aug levels are drawn from U[0, aug_max].
    sr_target: SR stages: what is diffused. "image" (the paper): the image
      itself; "residual": the image minus its low-res input upsampled (the
      network's own resize), so an untrained network already returns the
      interpolated image and training only has to add the missing detail.
  """
  unet: UNet
  resolution: int
  lowres_resolution: int = 0
  train_crop: int = 0
  # Every field of config_defaults.DIFFUSION, with its declared default.
  schedule: str = _diffusion_default("schedule")
  schedule_shift: float = _diffusion_default("schedule_shift")
  prediction: str = _diffusion_default("prediction")
  weighting: str = _diffusion_default("weighting")
  min_snr_gamma: float = _diffusion_default("min_snr_gamma")
  cond_drop_prob: float = _diffusion_default("cond_drop_prob")
  aug_schedule: str = _diffusion_default("aug_schedule")
  aug_max: float = _diffusion_default("aug_max")
  sr_target: str = _diffusion_default("sr_target")

  def __post_init__(self):
    check_sr_target(self.sr_target)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Stage":
    """Builds the stage a full experiment config describes."""
    d = config.diffusion
    # A workdir written before a field was declared lacks it: its default.
    diffusion = {name: spec.kind(d.get(name, spec.default))
                 for name, spec in config_defaults.DIFFUSION.items()}
    return cls(
        unet=build.build_unet(config.model),
        resolution=int(config.resolution),
        lowres_resolution=int(config.lowres_resolution),
        train_crop=int(config.train_crop), **diffusion)

  @property
  def is_sr(self) -> bool:
    return self.lowres_resolution > 0

  @property
  def learned_variance(self) -> bool:
    """The network also outputs variance channels (IF: eps + 3 more)."""
    return self.unet.out_channels == 2 * self.unet.in_channels

  def lowres_for_augment(self, lowres: jax.Array, shape: tuple) -> jax.Array:
    """The low-res input as it gets noise-augmented, float ``[B, h, w, C]``.

    IF upsamples it (corners aligned) to the output size first and noises
    that; our U-Nets noise it at its own size and upsample inside.
    """
    low = to_float_image(lowres)
    if self.unet.family == "if":
      low = if_blocks.resize_align_corners(low, shape[1], shape[2])
    return low

  def logsnr_schedule(self):
    return diffusion.get_logsnr_schedule(self.schedule,
                                         shift=self.schedule_shift)

  def aug_logsnr_schedule(self):
    return diffusion.get_logsnr_schedule(self.aug_schedule)

  def residual_base(self, lowres: jax.Array, shape: tuple) -> Optional[jax.Array]:
    """What the diffused variable is relative to: None, or for SR stages
    with ``sr_target="residual"`` the clean low-res input upsampled to
    ``shape`` ``[B, H, W, C]`` as the network upsamples it."""
    if not (self.is_sr and self.sr_target == "residual"):
      return None
    return jax.image.resize(to_float_image(lowres), shape,
                            self.unet.lowres_resize)

  # --- training -------------------------------------------------------------------

  def loss(self, params: Any, batch: dict, rng: jax.Array, *,
           train: bool = True) -> tuple[jax.Array, dict]:
    """Mean denoising loss of a batch and per-example diagnostics.

    Args:
      params: U-Net params.
      batch: see module docstring.
      rng: PRNG key of this step (crop, text dropout, aug level, t, noise,
        dropout are all derived from it).
      train: enables network dropout.

    Returns:
      (scalar loss, aux) with aux ``loss`` ``[B]``, ``t`` ``[B]``.
    """
    crop_rng, drop_rng, aug_rng, diff_rng, dropout_rng = jax.random.split(rng, 5)
    image = to_float_image(batch["image"])
    lowres = batch.get("lowres")
    if self.is_sr and lowres is None:
      raise ValueError("SR stage batch has no 'lowres' images.")
    if self.train_crop and image.shape[1] > self.train_crop:
      image, lowres = random_aligned_crop(image, lowres, self.train_crop,
                                          crop_rng)
    offset = self.residual_base(lowres, image.shape)
    if offset is not None:
      image = image - offset
    b = image.shape[0]
    text, mask = batch["text"], batch["text_mask"].astype(bool)
    # Classifier-free guidance: the null text is the zeroed, fully masked
    # embedding, exactly what sampling uses as the unconditional input.
    keep = jax.random.uniform(drop_rng, (b,)) >= self.cond_drop_prob
    text = jnp.where(keep[:, None, None], text, 0).astype(text.dtype)
    mask = mask & keep[:, None]
    extra = {}
    if self.is_sr:
      level_rng, noise_rng = jax.random.split(aug_rng)
      level = jax.random.uniform(level_rng, (b,), maxval=self.aug_max)
      low, aug_logsnr = diffusion.augment_lowres(
          self.lowres_for_augment(lowres, image.shape), level, noise_rng,
          schedule=self.aug_logsnr_schedule())
      extra = dict(lowres=low, aug_logsnr=aug_logsnr)

    def model_fn(z, logsnr):
      pred = self.unet.apply({"params": params}, z, logsnr, text, mask,
                             train=train, rngs={"dropout": dropout_rng},
                             **extra)
      # Learned-variance channels get no loss here (no VLB term): they keep
      # the values they were converted or initialised with.
      return pred[..., :image.shape[-1]] if self.learned_variance else pred

    per_example, aux = diffusion.diffusion_loss(
        model_fn, image, diff_rng, schedule=self.logsnr_schedule(),
        prediction=self.prediction, weighting=self.weighting,
        min_snr_gamma=self.min_snr_gamma)
    return per_example.mean(), {"loss": per_example, "t": aux["t"]}

  # --- sampling -------------------------------------------------------------------

  def sample(self, params: Any, inputs: SampleInputs, rng: jax.Array,
             settings: StageSettings, *, resolution: Optional[int] = None,
             start_logsnr: Optional[float] = None,
             noise: Optional[dict] = None, progress_fn=None) -> jax.Array:
    """Samples images for a batch of text embeddings (jit this).

    Classifier-free guidance runs when ``settings.guidance_scale != 1``: the
    network then runs once per step on 2B examples (conditional and
    unconditional or negative text, batched); otherwise once on B, the
    negative text unused (at scale 1 guidance is the conditional prediction
    whatever the unconditional one).

    Args:
      params: U-Net params (EMA params in practice).
      inputs: text, and the low-res images (SR stages), negative text and
        init image where used (see ``SampleInputs``).
      rng: PRNG key.
      settings: sampler, steps (or a discrete schedule's ``timesteps``
        respacing, which then sets them), guidance, thresholding, aug level,
        eta.
      resolution: output size (default: the stage's).
      start_logsnr: start from ``inputs.init_image`` noised to this log-SNR
        instead of from pure noise (img2img).
      noise: fixed draws instead of ones from ``rng``, to reproduce another
        implementation's run: "init" ``[B, R, R, C]``, "steps" ``[N, B, R,
        R, C]`` and, for SR stages, "aug" (the low-res augmentation noise).
      progress_fn: host callback with the step index.

    Returns:
      Images ``[B, R, R, C]`` float32 in [-1, 1].
    """
    self.check_inputs(inputs, start_logsnr)
    text, mask = inputs.text, inputs.text_mask.astype(bool)
    b = text.shape[0]
    res = resolution or self.resolution
    channels = self.unet.in_channels
    extra = {}
    offset = None
    if self.is_sr:
      offset = self.residual_base(inputs.lowres, (b, res, res, channels))
      aug_rng, rng = jax.random.split(rng)
      low = self.lowres_for_augment(inputs.lowres, (b, res, res, channels))
      if noise is not None and "aug" in noise:
        aug_logsnr = self.aug_logsnr_schedule()(
            jnp.full((b,), settings.aug_level, jnp.float32))
        low = diffusion.q_sample(low, aug_logsnr, noise["aug"])
      else:
        low, aug_logsnr = diffusion.augment_lowres(
            low, settings.aug_level, aug_rng,
            schedule=self.aug_logsnr_schedule())
      extra = dict(lowres=low, aug_logsnr=aug_logsnr)

    def model_fn(z, logsnr, cond):
      # Guidance runs the conditional and unconditional halves as one batch.
      n = z.shape[0]
      kw = {k: (v if v.shape[0] == n else jnp.concatenate([v] * (n // v.shape[0])))
            for k, v in extra.items()}
      return self.unet.apply({"params": params}, z, logsnr, cond[0], cond[1], **kw)

    common = dict(prediction=self.prediction, threshold=settings.threshold,
                  percentile=settings.percentile,
                  threshold_max=settings.threshold_max,
                  learned_variance=self.learned_variance, x0_offset=offset)
    if settings.guidance_scale == 1.0:
      denoise = diffusion.make_denoiser(model_fn, cond=(text, mask), **common)
    else:
      if inputs.negative_text is None:
        uncond = (jnp.zeros_like(text), jnp.zeros_like(mask))
      else:
        uncond = (inputs.negative_text.astype(text.dtype),
                  inputs.negative_mask.astype(bool))
      denoise = diffusion.make_guided_denoiser(
          model_fn, cond=(text, mask), uncond=uncond,
          guidance_scale=settings.guidance_scale, **common)
    init_x = None
    if start_logsnr is not None:
      init_x = to_float_image(inputs.init_image)
      if offset is not None:
        init_x = init_x - offset
    levels, num_steps = None, settings.num_steps
    if settings.timesteps:
      problem = config_defaults.timesteps_problem(settings.timesteps,
                                                  self.schedule)
      if problem:
        raise ValueError(problem)
      levels = discrete.respaced_logsnrs(settings.timesteps)
      num_steps = len(levels)
    out = diffusion.sample(
        denoise, shape=(b, res, res, channels), rng=rng,
        schedule=self.logsnr_schedule(), sampler=settings.sampler,
        num_steps=num_steps, eta=settings.eta, init_x=init_x,
        start_logsnr=start_logsnr, logsnr_levels=levels,
        noise=None if noise is None else (noise["init"], noise["steps"]),
        progress_fn=progress_fn)
    return out if offset is None else out + offset

  def check_inputs(self, inputs: SampleInputs,
                   start_logsnr: Optional[float] = None) -> None:
    """Raises a one-line ValueError if ``inputs`` do not fit this stage."""
    b = inputs.text.shape[0]
    if inputs.text_mask.shape != inputs.text.shape[:2]:
      raise ValueError(f"text_mask has shape {inputs.text_mask.shape}; it must "
                       f"be the text's [B, L] = {inputs.text.shape[:2]}.")
    if self.is_sr and inputs.lowres is None:
      raise ValueError("This is a super-resolution stage: pass the low-res "
                       "images to sample from (SampleInputs.lowres).")
    if not self.is_sr and inputs.lowres is not None:
      raise ValueError("This is a base stage: it takes no low-res images; "
                       "leave SampleInputs.lowres unset.")
    if (inputs.negative_text is None) != (inputs.negative_mask is None):
      raise ValueError("Give negative_text and negative_mask together.")
    if (inputs.init_image is None) != (start_logsnr is None):
      raise ValueError("init_image and start_logsnr go together: the init "
                       "image is noised to start_logsnr.")
    for name in ("lowres", "negative_text", "negative_mask", "init_image"):
      x = getattr(inputs, name)
      if x is not None and x.shape[0] != b:
        raise ValueError(f"{name} has {x.shape[0]} examples for {b} texts; "
                         "give one per text.")

  def uint8_sampler(self, settings: StageSettings, *,
                    start_logsnr: Optional[float] = None, progress_fn=None):
    """The sampling function the cascade and training's sample grids jit.

    One definition for both, so that a training run's periodic samples are
    drawn exactly as ``Cascade.sample`` draws them with the same settings.

    Args:
      settings: sampler, steps, guidance, thresholding, aug level, eta.
      start_logsnr: start from ``inputs.init_image`` noised to this level.
      progress_fn: host callback with the step index.

    Returns:
      ``run(params, inputs, rng)`` -> uint8 images ``[B, R, R, C]``, with
      ``inputs`` a ``SampleInputs``.
    """
    def run(params, inputs: SampleInputs, rng):
      return to_uint8_image(self.sample(params, inputs, rng, settings,
                                        start_logsnr=start_logsnr,
                                        progress_fn=progress_fn))

    return run
