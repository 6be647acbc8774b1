"""Text-conditioned U-Net: Imagen's base U-Net and its Efficient U-Net.

One class, two layouts:

* ``efficient=False`` (base 64x64, after Improved DDPM / ADM): level i works
  at resolution R / 2^i; a skip is kept after every res block and every
  downsample; up levels have one more res block than down levels; a middle
  block (res, attention, res) sits at the bottom.
* ``efficient=True`` (Imagen's Efficient U-Net for super-resolution): every
  level first downsamples (D block: downsample *before* its convolutions) and
  every up level upsamples *after* its convolutions (U block); one skip per
  level, scaled by 1/sqrt(2); the conditioning embedding is combined once per
  D/U block (FiLM after the resampling conv, Imagen's CombineEmbs) instead of
  in every res block; more res blocks at low resolution come from a
  per-level ``num_res_blocks``.

Conditioning: the noise level (log-SNR) through a sinusoidal embedding and an
MLP; for SR stages the augmentation level through its own MLP, added; the
pooled text vector (attention pooling, LayerNorm) projected and added; masked
cross-attention over the whole text sequence at chosen levels, with a learned
always-visible null token so all-masked (null) text is well defined and
padding has no effect. SR stages receive the low-res image, resized to the
stage resolution and concatenated to the noisy input.

``family="if"`` builds DeepFloyd IF's network in the standard layout with
IF's blocks (``if_blocks``): GELU scale-shift res blocks that also do the
resampling, attention over [text, image] tokens, IF's attention pooling and
discrete-step time embedding, a noise-augmentation step embedding for stage
II, and ``out_channels=6`` for eps plus learned-variance channels.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import config_defaults
from imagen_jax.models import if_blocks
from imagen_jax.models import layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def _per_level(value, levels: int, name: str) -> tuple:
  if isinstance(value, (int, bool)):
    return (value,) * levels
  value = tuple(value)
  if len(value) != levels:
    raise ValueError(f"{name} has {len(value)} entries but channel_mult has "
                     f"{levels} levels; give one per level.")
  return value


def settings_module(schema: dict) -> type:
  """An ``nn.Module`` base class with one attribute per field of ``schema``.

  Args:
    schema: field name -> ``config_defaults.Field``.

  Returns:
    A flax module class whose dataclass attributes are the fields, each with
    its declared default.
  """
  namespace = {name: spec.default for name, spec in schema.items()}
  namespace["__annotations__"] = {name: spec.kind
                                  for name, spec in schema.items()}
  namespace["__module__"] = __name__
  return type("ModelSettings", (nn.Module,), namespace)


# The U-Net's settings are declared once, in config_defaults.MODEL (name,
# default, type, range, meaning): a field declared there is a UNet attribute.
ModelSettings = settings_module(config_defaults.MODEL)


class UNet(ModelSettings):
  """Text-conditioned U-Net for one diffusion stage.

  Its attributes are the fields of ``config_defaults.MODEL`` with their
  declared defaults (``ModelSettings``), so the UNet built from a config and
  one built with no arguments agree and a new field needs no second
  declaration. What they mean:

  Attributes:
    base_channels: width of level 0 (embed dim in the paper).
    channel_mult: width multiplier per level.
    num_res_blocks: res blocks per level (int or one per level).
    self_attn: self-attention per level (bool or one per level).
    cross_attn: text cross-attention per level (bool or one per level).
    efficient: Efficient U-Net layout (see module docstring).
    mid_attn: middle block with attention (non-efficient layout only).
    full_res_skip: efficient layout only: concatenate the input
      convolution's features (full resolution) to the last U block's output
      before the output norm and convolution. Without it every path from
      input to output goes through level 0's downsample, so the output
      convolution sees the image only through half-resolution features
      (a long skip as in imagen-pytorch's ``init_conv_to_final_conv_residual``).
    head_dim: channels per attention head.
    ff_mult: MLP width multiplier inside attention blocks (0 = no MLP).
    text_dim: width of the text embeddings the stage is fed (T5 d_model).
    cond_dim: width the text is projected to for cross-attention.
    text_layers: trainable Transformer layers (sinusoidal positions) over the
      projected text before pooling and cross-attention; 0 is Imagen's
      projection alone (``layers.TextTransformer``).
    emb_dim: width of the time/conditioning embedding (default 4 x base).
    in_channels: channels of the image being denoised.
    out_channels: channels of the prediction (default in_channels).
    lowres_cond: True for super-resolution stages.
    lowres_resize: "bilinear" or "bicubic" upsampling of the low-res input.
    num_groups: GroupNorm groups.
    dropout: dropout rate inside res blocks.
    dtype: compute dtype name ("float32", "bfloat16"); params stay float32.
    remat: rematerialisation policy per block: "none", "full", "dots",
      "dots_no_batch".
    family: "imagen" or "if" (DeepFloyd IF's blocks, standard layout only;
      attention at the levels with ``cross_attn``, over text and image
      tokens where ``self_attn`` is set, over the text alone elsewhere).
    res_scale: IF: res blocks' outputs are divided by this.
    mid_scale: IF: the same for the middle block's res blocks.
    emb_act: IF: GELU on the summed conditioning embedding (IF-II).
    skip_time_act: IF: res blocks project the embedding without a GELU
      first (IF-II, whose embedding is activated once by ``emb_act``).
    pool_heads: IF: heads of the text attention pooling.
    kernels: kernel implementation (``imagen_jax.kernels.CHOICES``): "auto"
      (the backend's default), "reference", "xla_cpu", "cudnn".
  """

  def _check_inputs(self, x, logsnr, text, text_mask, lowres, aug_logsnr):
    levels = len(self.channel_mult)
    if x.ndim != 4:
      raise ValueError(f"Image input must be [B, H, W, C], got shape {x.shape}.")
    b, h, w, c = x.shape
    if c != self.in_channels:
      raise ValueError(f"Image has {c} channels but the U-Net expects "
                       f"in_channels={self.in_channels}.")
    factor = 2 ** (levels if self.efficient else levels - 1)
    if h % factor or w % factor:
      raise ValueError(f"Resolution {h}x{w} is not divisible by {factor}, the "
                       f"down-sampling factor of {levels} levels; use a "
                       f"multiple of {factor}.")
    if logsnr.shape != (b,):
      raise ValueError(f"Noise level must have shape [B]=({b},), got {logsnr.shape}.")
    if text.ndim != 3 or text.shape[0] != b:
      raise ValueError(f"Text embeddings must be [B, L, D] with B={b}, got "
                       f"{text.shape}.")
    if text.shape[-1] != self.text_dim:
      raise ValueError(f"Text embeddings have width {text.shape[-1]} but the "
                       f"U-Net was configured with text_dim={self.text_dim}; "
                       "use the T5 size the stage was built for.")
    if text_mask.shape != text.shape[:2]:
      raise ValueError(f"Text mask shape {text_mask.shape} does not match the "
                       f"embeddings' [B, L] = {text.shape[:2]}.")
    if self.lowres_cond:
      if lowres is None or aug_logsnr is None:
        raise ValueError("This is a super-resolution U-Net (lowres_cond=True): "
                         "pass the low-res image and its aug level.")
      if lowres.ndim != 4 or lowres.shape[0] != b or lowres.shape[-1] != c:
        raise ValueError(f"Low-res input must be [B, h, w, {c}], got "
                         f"{lowres.shape}.")
    elif lowres is not None:
      raise ValueError("A low-res image was given to a U-Net built without "
                       "lowres_cond; set lowres_cond=True for SR stages.")

  @nn.compact
  def __call__(self, x: jax.Array, logsnr: jax.Array, text: jax.Array,
               text_mask: jax.Array, lowres: Optional[jax.Array] = None,
               aug_logsnr: Optional[jax.Array] = None, *,
               train: bool = False) -> jax.Array:
    """Predicts the stage's target (eps, x0 or v) for noisy images.

    Args:
      x: noisy images ``[B, H, W, C]``.
      logsnr: noise levels ``[B]`` (log-SNR).
      text: text embeddings ``[B, L, text_dim]``.
      text_mask: ``[B, L]`` bool, True for real tokens.
      lowres: SR stages only: low-res images ``[B, h, w, C]`` (already
        noise-augmented).
      aug_logsnr: SR stages only: augmentation levels ``[B]`` (log-SNR).
      train: enables dropout (needs a "dropout" rng).

    Returns:
      Predictions ``[B, H, W, out_channels]`` in float32.
    """
    self._check_inputs(x, logsnr, text, text_mask, lowres, aug_logsnr)
    if self.full_res_skip and not self.efficient:
      raise ValueError("full_res_skip applies to the efficient layout "
                       "(family='imagen', efficient=True); set "
                       "full_res_skip=False or use that layout.")
    if self.family == "if":
      return self._if_network(x, logsnr, text, text_mask, lowres, aug_logsnr)
    if self.family != "imagen":
      raise ValueError(f"Unknown U-Net family {self.family!r}; use 'imagen' "
                       "or 'if'.")
    dtype = DTYPES[self.dtype]
    num_blocks, self_attn, cross_attn, widths, emb_dim = self._layout()
    b, height, width, channels = x.shape

    policy = REMAT_POLICIES[self.remat]
    res_cls, attn_cls = layers.ResBlock, layers.AttentionBlock
    if self.remat != "none":
      res_cls = nn.remat(res_cls, policy=policy)
      attn_cls = nn.remat(attn_cls, policy=policy)

    # --- conditioning --------------------------------------------------------
    ctx = layers.layer_norm(dtype, name="text_norm")(text.astype(dtype))
    kn = self.kernels
    ctx = layers.dense(self.cond_dim, dtype, kernels=kn, name="text_proj")(ctx)
    if self.text_layers:
      ctx = layers.TextTransformer(self.text_layers, self.head_dim,
                                   max(self.ff_mult, 2), dtype, kn,
                                   name="text_layers")(ctx, text_mask)
    null = self.param("null_token", layers.partitioned(
        nn.initializers.normal(0.02), (None, "embed")), (1, self.cond_dim))
    ctx = jnp.concatenate(
        [jnp.broadcast_to(null[None].astype(dtype), (b, 1, self.cond_dim)), ctx],
        axis=1)  # [B, 1 + L, cond_dim]
    ctx = layers.constrain_seq(ctx)
    ctx_mask = jnp.concatenate([jnp.ones((b, 1), bool), text_mask.astype(bool)],
                               axis=1)
    # Padding must not reach the output: zero masked tokens before any
    # position-independent op could mix them in (attention already masks).
    ctx = jnp.where(ctx_mask[..., None], ctx, 0).astype(dtype)

    emb = layers.NoiseLevelMLP(emb_dim, dtype, kn, name="time_mlp")(logsnr)
    if self.lowres_cond:
      emb = emb + layers.NoiseLevelMLP(emb_dim, dtype, kn,
                                       name="aug_mlp")(aug_logsnr)
    emb = emb + layers.AttentionPool(emb_dim, self.head_dim, dtype, kn,
                                     name="text_pool")(ctx, ctx_mask)
    emb = emb.astype(dtype)

    # --- input ---------------------------------------------------------------
    h = x.astype(dtype)
    if self.lowres_cond:
      up = jax.image.resize(lowres.astype(jnp.float32),
                            (b, height, width, channels), self.lowres_resize)
      h = jnp.concatenate([h, up.astype(dtype)], axis=-1)
    h = layers.conv(widths[0], dtype, kernels=kn, name="conv_in")(h)
    h = layers.constrain_image(h)

    def res_block(name, feats, inp):
      return res_cls(feats, self.num_groups, self.dropout,
                     use_film=not self.efficient, deterministic=not train,
                     dtype=dtype, kernels=kn, name=name)(inp, emb)

    def attn_block(name, level, inp, self_on=None):
      use_self = self_attn[level] if self_on is None else self_on
      if not (use_self or cross_attn[level]):
        return inp
      return attn_cls(use_self, cross_attn[level], self.head_dim, self.ff_mult,
                      self.num_groups, dtype, kn, name=name)(inp, ctx, ctx_mask)

    if self.efficient:
      h_in = h                                          # [B, H, W, C0]
      h = self._efficient(h, emb, widths, num_blocks, res_block, attn_block)
      if self.full_res_skip:
        h = jnp.concatenate([h, h_in], axis=-1)         # [B, H, W, 2 * C0]
    else:
      h = self._standard(h, widths, num_blocks, res_block, attn_block)

    h = layers.group_norm(self.num_groups, dtype, kn, name="norm_out")(
        h, activation="silu")
    out = layers.conv(self.out_channels or self.in_channels, dtype,
                      kernel_init=layers.ZEROS, kernels=kn, name="conv_out")(h)
    return out.astype(jnp.float32)

  def _standard(self, h, widths, num_blocks, res_block, attn_block,
                down_fn=None, up_fn=None):
    levels = len(widths)
    dtype = DTYPES[self.dtype]
    down_fn = down_fn or (lambda feats, name, inp: layers.Downsample(
        feats, dtype, self.kernels, name=name)(inp))
    up_fn = up_fn or (lambda feats, name, inp: layers.Upsample(
        feats, dtype, self.kernels, name=name)(inp))
    skips = [h]
    for i in range(levels):
      for j in range(num_blocks[i]):
        h = res_block(f"down_{i}_res_{j}", widths[i], h)
        h = attn_block(f"down_{i}_attn_{j}", i, h)
        skips.append(h)
      if i < levels - 1:
        h = down_fn(widths[i], f"down_{i}_resample", h)
        skips.append(h)
    h = res_block("mid_res_0", widths[-1], h)
    if self.mid_attn:
      h = attn_block("mid_attn", levels - 1, h, self_on=True)
    h = res_block("mid_res_1", widths[-1], h)
    for i in reversed(range(levels)):
      for j in range(num_blocks[i] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(f"up_{i}_res_{j}", widths[i], h)
        h = attn_block(f"up_{i}_attn_{j}", i, h)
      if i > 0:
        h = up_fn(widths[i], f"up_{i}_resample", h)
    assert not skips
    return h

  def _layout(self) -> tuple[tuple, tuple, tuple, list[int], int]:
    """Per-level res blocks, self- and cross-attention flags and widths, and
    the embedding width, from the attributes."""
    levels = len(self.channel_mult)
    return (_per_level(self.num_res_blocks, levels, "num_res_blocks"),
            _per_level(self.self_attn, levels, "self_attn"),
            _per_level(self.cross_attn, levels, "cross_attn"),
            [self.base_channels * m for m in self.channel_mult],
            self.emb_dim or 4 * self.base_channels)

  def _if_network(self, x, logsnr, text, text_mask, lowres, aug_logsnr):
    """DeepFloyd IF's U-Net (``family="if"``); see ``if_blocks``."""
    if self.efficient:
      raise ValueError("family='if' uses the standard layout; set "
                       "efficient=False.")
    dtype = DTYPES[self.dtype]
    num_blocks, self_attn, cross_attn, widths, emb_dim = self._layout()
    b, height, width, channels = x.shape
    kn = self.kernels
    res_cls, attn_cls = if_blocks.ResBlock, if_blocks.AttentionBlock
    if self.remat != "none":
      res_cls = nn.remat(res_cls, policy=REMAT_POLICIES[self.remat])
      attn_cls = nn.remat(attn_cls, policy=REMAT_POLICIES[self.remat])

    emb = if_blocks.StepMLP(widths[0], emb_dim, dtype, kn, name="time_mlp")(
        if_blocks.logsnr_to_step(logsnr))
    if self.lowres_cond:
      emb = emb + if_blocks.StepMLP(widths[0], emb_dim, dtype, kn,
                                    name="aug_mlp")(
                                        if_blocks.logsnr_to_step(aug_logsnr))
    emb = emb + if_blocks.TextPool(emb_dim, self.pool_heads, dtype, kn,
                                   name="text_pool")(text)
    if self.emb_act:
      emb = if_blocks.gelu(emb)
    ctx = if_blocks.dense(self.cond_dim, dtype, "text_proj", kernels=kn)(
        text.astype(dtype))
    ctx = layers.constrain_seq(ctx)
    mask = text_mask.astype(bool)

    h = x.astype(dtype)
    if self.lowres_cond:
      # IF noises its low-res input after upsampling it, so it may arrive at
      # the output size already.
      up = lowres
      if lowres.shape[1:3] != (height, width):
        up = if_blocks.resize_align_corners(lowres, height, width)
      h = jnp.concatenate([h, up.astype(dtype)], axis=-1)
    h = if_blocks.conv(widths[0], dtype, "conv_in", kernels=kn)(h)

    def res_block(name, feats, inp, resample=None):
      scale = self.mid_scale if name.startswith("mid") else self.res_scale
      return res_cls(feats, self.num_groups, resample,
                     not self.skip_time_act, scale, dtype, kn,
                     name=name)(inp, emb)

    def attn_block(name, level, inp, self_on=None):
      if self_on is None and not cross_attn[level]:
        return inp
      return attn_cls(self.head_dim, self.num_groups, 32,
                      not self_attn[level], dtype, kn,
                      name=name)(inp, ctx, mask)

    h = self._standard(
        h, widths, num_blocks, res_block, attn_block,
        down_fn=lambda f, name, inp: res_block(name, f, inp, "down"),
        up_fn=lambda f, name, inp: res_block(name, f, inp, "up"))
    h = if_blocks.gelu(if_blocks.group_norm(self.num_groups, "norm_out", kn)(h))
    out = if_blocks.conv(self.out_channels or self.in_channels, dtype,
                         "conv_out", kernels=kn)(h.astype(dtype))
    return out.astype(jnp.float32)

  def _efficient(self, h, emb, widths, num_blocks, res_block, attn_block):
    levels = len(widths)
    skip_scale = 1.0 / math.sqrt(2.0)
    skips = []
    for i in range(levels):
      # D block: downsample before the convolutions.
      h = layers.Downsample(widths[i], DTYPES[self.dtype], self.kernels,
                            name=f"down_{i}_resample")(h)
      h = layers.film(h, emb, DTYPES[self.dtype], f"down_{i}_combine_embs",
                      self.kernels)
      for j in range(num_blocks[i]):
        h = res_block(f"down_{i}_res_{j}", widths[i], h)
        h = attn_block(f"down_{i}_attn_{j}", i, h)
      skips.append(h)
    # The lowest D block's output is the lowest U block's input already; a
    # skip there would concatenate a tensor with itself.
    skips.pop()
    for i in reversed(range(levels)):
      # U block: scaled skip in, convolutions, then upsample after them.
      if i < levels - 1:
        h = jnp.concatenate([h, skips.pop() * skip_scale], axis=-1)
      h = layers.film(h, emb, DTYPES[self.dtype], f"up_{i}_combine_embs",
                      self.kernels)
      for j in range(num_blocks[i]):
        h = res_block(f"up_{i}_res_{j}", widths[i], h)
        h = attn_block(f"up_{i}_attn_{j}", i, h)
      h = layers.Upsample(widths[i - 1] if i > 0 else widths[0],
                          DTYPES[self.dtype], self.kernels,
                          name=f"up_{i}_resample")(h)
    return h
