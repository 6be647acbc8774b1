"""DeepFloyd IF's U-Net pieces, for ``UNet(family="if")``.

IF's U-Net (Shonenkov et al. 2023, after ADM / Improved DDPM) differs from
Imagen's in its blocks, not in its layout (which is ``UNet``'s standard one):

* res blocks use GELU and scale-shift normalisation
  ``norm(h) * (1 + s) + t``; resampling is a res block whose both paths are
  average-pooled (down) or nearest-upsampled (up); outputs may be divided by
  a fixed factor;
* attention blocks attend from the image tokens to the projected text tokens
  concatenated with the image tokens themselves (or to the text alone), the
  text GroupNorm'ed per block;
* the text is pooled by an attention whose query is the tokens' mean plus a
  learned position vector, projected and LayerNorm'ed, and added to the
  time embedding;
* the time input is the discrete DDPM step index (0..999) of the 1,000-step
  cosine schedule, embedded as [cos, sin]; stage II embeds its
  noise-augmentation step the same way ("class" embedding) and adds it.

Parameter names follow our conventions; ``imagen_jax.convert_if`` maps IF's
diffusers checkpoints onto them. Every parameter carries logical axis names.
Dense, Conv and GroupNorm are ``layers``' (flax's parameters), and they and
the attention go through the kernel interface (``config.model.kernels``) as
the Imagen blocks do, so a backend's kernels serve both families.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import kernels as kernels_lib
from imagen_jax.diffusion import discrete
from imagen_jax.models import layers

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, IF's activation everywhere."""
  return jax.nn.gelu(x, approximate=False)


def dense(features: int, dtype: Dtype, name: str, names=("embed", "mlp"),
          kernels: str = "auto") -> layers.Dense:
  """``layers.dense`` (nn.Dense's parameters, the bias add a kernel)."""
  return layers.dense(features, dtype, names=names, kernels=kernels, name=name)


def conv(features: int, dtype: Dtype, name: str, kernel: int = 3,
         kernels: str = "auto") -> layers.Conv:
  """``layers.conv`` (nn.Conv's parameters, the bias add a kernel)."""
  return layers.conv(features, dtype, kernel=kernel, kernels=kernels, name=name)


def group_norm(groups: int, name: str, kernels: str = "auto"
               ) -> layers.GroupNorm:
  """GroupNorm (epsilon 1e-5) with float32 statistics and output."""
  return layers.group_norm(groups, jnp.float32, kernels, name=name)


def layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm with float32 statistics and output."""
  return layers.layer_norm(jnp.float32, name=name)


def step_embedding(steps: jax.Array, dim: int) -> jax.Array:
  """IF's sinusoidal embedding of (fractional) step indices, [cos, sin].

  Args:
    steps: ``[B]`` step indices in [0, 999].
    dim: embedding width (even).

  Returns:
    ``[B, dim]`` float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = steps.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def logsnr_to_step(logsnr: jax.Array) -> jax.Array:
  """The (fractional) IF step index whose log-SNR is ``logsnr`` ``[B]``."""
  return discrete.step_from_logsnr(logsnr)


class StepMLP(nn.Module):
  """Step index -> sinusoid -> Dense -> GELU -> Dense (IF's time embedding)."""
  in_dim: int
  features: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, steps: jax.Array) -> jax.Array:
    # steps: [B] -> [B, features]
    emb = step_embedding(steps, self.in_dim).astype(self.dtype)
    emb = dense(self.features, self.dtype, "dense_0", kernels=self.kernels)(emb)
    return dense(self.features, self.dtype, "dense_1", names=("mlp", "embed"),
                 kernels=self.kernels)(gelu(emb))


class TextPool(nn.Module):
  """IF's attention pooling of the T5 sequence into one embedding vector.

  The query is the token mean plus a learned position vector; keys and values
  are the query token and all tokens (IF pools over every position it is
  given: it was trained without a text mask here). No output projection
  inside the attention; then a Dense to ``features`` and a LayerNorm.
  """
  features: int
  num_heads: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    # text: [B, L, D] -> [B, features]
    b, _, d = text.shape
    kn = self.kernels
    x = layer_norm("norm_in")(text).astype(self.dtype)
    pos = self.param("position", layers.partitioned(
        nn.initializers.normal(d ** -0.5), (None, "embed")), (1, d))
    cls = jnp.mean(x, axis=1, keepdims=True) + pos[None].astype(self.dtype)
    tokens = jnp.concatenate([cls, x], axis=1)        # [B, 1 + L, D]
    heads, hd = self.num_heads, d // self.num_heads
    q = dense(d, self.dtype, "query", kernels=kn)(cls).reshape(b, 1, heads, hd)
    k = dense(d, self.dtype, "key", kernels=kn)(tokens).reshape(
        b, -1, heads, hd)
    v = dense(d, self.dtype, "value", kernels=kn)(tokens).reshape(
        b, -1, heads, hd)
    pooled = kernels_lib.get(kn).attention(q, k, v, None).reshape(b, d)
    pooled = dense(self.features, self.dtype, "proj", kernels=kn)(pooled)
    return layer_norm("norm_out")(pooled)


class ResBlock(nn.Module):
  """IF's res block: GN-GELU-(resample)-conv, scale-shift GN-GELU-conv, skip.

  ``resample`` is "down" (2x2 average pool of both paths), "up" (nearest x2
  of both paths) or None. ``emb_act`` applies GELU to the embedding before
  its projection (IF-I; IF-II activates the embedding once, up front). The
  scale-shift ``(norm(h) * g + b) * (1 + s) + t`` is one
  ``kernels.group_norm_act`` (``layers.GroupNorm`` folds it into the affine).
  """
  features: int
  num_groups: int = 32
  resample: Optional[str] = None
  emb_act: bool = True
  out_scale: float = 1.0
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin]; emb: [B, E]
    kn = self.kernels
    h = gelu(group_norm(self.num_groups, "norm_0", kn)(x)).astype(self.dtype)
    if self.resample == "down":
      x, h = (nn.avg_pool(t, (2, 2), (2, 2)) for t in (x, h))
    elif self.resample == "up":
      x, h = (jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2) for t in (x, h))
    h = conv(self.features, self.dtype, "conv_0", kernels=kn)(h)
    e = gelu(emb) if self.emb_act else emb
    film = dense(2 * self.features, self.dtype, "film", kernels=kn)(
        e.astype(self.dtype))
    scale, shift = jnp.split(film.astype(jnp.float32), 2, axis=-1)  # [B, C]
    h = group_norm(self.num_groups, "norm_1", kn)(h, film=(scale, shift))
    h = conv(self.features, self.dtype, "conv_1", kernels=kn)(
        gelu(h).astype(self.dtype))
    if x.shape[-1] != self.features:
      x = conv(self.features, self.dtype, "skip", kernel=1, kernels=kn)(
          x.astype(self.dtype))
    out = (x.astype(jnp.float32) + h.astype(jnp.float32)) / self.out_scale
    return layers.constrain_image(out.astype(self.dtype))


class AttentionBlock(nn.Module):
  """IF's attention: image queries over [text tokens, image tokens] (or text).

  The text arrives projected to ``cond_dim``; it is GroupNorm'ed here (over
  all its positions) and projected to keys and values. The text mask hides
  masked tokens from the attention; the image tokens are always visible.
  Residual, with an output projection.
  """
  head_dim: int = 64
  num_groups: int = 32
  text_groups: int = 32
  only_cross: bool = False
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array,
               ctx_mask: Optional[jax.Array]) -> jax.Array:
    # x: [B, H, W, C]; ctx: [B, L, cond_dim]; ctx_mask: [B, L] or None
    b, hh, ww, c = x.shape
    kn = self.kernels
    heads = c // self.head_dim
    y = group_norm(self.num_groups, "norm", kn)(x).reshape(b, hh * ww, c)
    y = y.astype(self.dtype)
    # The text is GroupNorm'ed as a [B, L, 1, D] "image".
    t = group_norm(self.text_groups, "norm_text", kn)(ctx[:, :, None, :])
    t = t[:, :, 0, :].astype(self.dtype)                    # [B, L, D]

    def proj(name, inp):
      out = dense(c, self.dtype, name, names=("embed", "heads"),
                  kernels=kn)(inp)
      return out.reshape(b, inp.shape[1], heads, self.head_dim)

    q = proj("query", y)
    k, v = proj("text_key", t), proj("text_value", t)
    mask = ctx_mask
    if not self.only_cross:
      k = jnp.concatenate([k, proj("key", y)], axis=1)     # [B, L + HW, N, H]
      v = jnp.concatenate([v, proj("value", y)], axis=1)
      if mask is not None:
        mask = jnp.concatenate([mask, jnp.ones((b, hh * ww), bool)], axis=1)
    out = kernels_lib.get(kn).attention(q, k, v, mask)      # [B, T, N, H]
    out = dense(c, self.dtype, "out", names=("heads", "embed"), kernels=kn)(
        out.reshape(b, hh * ww, c))
    return (x.astype(jnp.float32) + out.reshape(b, hh, ww, c).astype(
        jnp.float32)).astype(self.dtype)


def resize_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize with corner pixels aligned (IF's low-res upsampling).

  Args:
    x: ``[B, h, w, C]``.
    height, width: output size.

  Returns:
    ``[B, height, width, C]`` float32.
  """
  x = x.astype(jnp.float32)

  def axis_weights(n_in, n_out):
    pos = (jnp.arange(n_out, dtype=jnp.float32) * ((n_in - 1) / max(n_out - 1, 1)))
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
    hi = jnp.clip(lo + 1, 0, n_in - 1)
    return lo, hi, pos - lo.astype(jnp.float32)

  lo, hi, f = axis_weights(x.shape[1], height)
  x = (x[:, lo] * (1.0 - f)[None, :, None, None]
       + x[:, hi] * f[None, :, None, None])
  lo, hi, f = axis_weights(x.shape[2], width)
  return (x[:, :, lo] * (1.0 - f)[None, None, :, None]
          + x[:, :, hi] * f[None, None, :, None])
