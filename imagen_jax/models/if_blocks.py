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
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import discrete

Dtype = Any

DEFAULT_INIT = nn.initializers.lecun_normal()
ZEROS = nn.initializers.zeros_init()
ONES = nn.initializers.ones_init()


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, IF's activation everywhere."""
  return jax.nn.gelu(x, approximate=False)


def dense(features: int, dtype: Dtype, name: str,
          names=("embed", "mlp")) -> nn.Dense:
  """Dense with float32 params, ``dtype`` compute and logical axis names."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_part(DEFAULT_INIT, names),
                  bias_init=_part(ZEROS, (names[-1],)), name=name)


def conv(features: int, dtype: Dtype, name: str, kernel: int = 3) -> nn.Conv:
  """SAME convolution with float32 params and logical axis names."""
  return nn.Conv(features, (kernel, kernel), padding="SAME", dtype=dtype,
                 param_dtype=jnp.float32,
                 kernel_init=_part(DEFAULT_INIT,
                                   (None, None, "conv_in", "conv_out")),
                 bias_init=_part(ZEROS, ("conv_out",)), name=name)


def group_norm(groups: int, name: str, epsilon: float = 1e-5) -> nn.GroupNorm:
  """GroupNorm over the last axis with float32 statistics and named params."""
  return nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=jnp.float32,
                      param_dtype=jnp.float32,
                      scale_init=_part(ONES, ("norm",)),
                      bias_init=_part(ZEROS, ("norm",)), name=name)


def layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm with float32 statistics and named params."""
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                      scale_init=_part(ONES, ("norm",)),
                      bias_init=_part(ZEROS, ("norm",)), name=name)


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

  @nn.compact
  def __call__(self, steps: jax.Array) -> jax.Array:
    emb = step_embedding(steps, self.in_dim).astype(self.dtype)
    emb = dense(self.features, self.dtype, "dense_0")(emb)
    return dense(self.features, self.dtype, "dense_1",
                 names=("mlp", "embed"))(gelu(emb))


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

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    # text: [B, L, D] -> [B, features]
    b, _, d = text.shape
    x = layer_norm("norm_in")(text).astype(self.dtype)
    pos = self.param("position", _part(nn.initializers.normal(d ** -0.5),
                                       (None, "embed")), (1, d))
    cls = jnp.mean(x, axis=1, keepdims=True) + pos[None].astype(self.dtype)
    tokens = jnp.concatenate([cls, x], axis=1)        # [B, 1 + L, D]
    heads, hd = self.num_heads, d // self.num_heads
    q = dense(d, self.dtype, "query")(cls).reshape(b, 1, heads, hd)
    k = dense(d, self.dtype, "key")(tokens).reshape(b, -1, heads, hd)
    v = dense(d, self.dtype, "value")(tokens).reshape(b, -1, heads, hd)
    pooled = jax.nn.dot_product_attention(q, k, v).reshape(b, d)
    pooled = dense(self.features, self.dtype, "proj")(pooled)
    return layer_norm("norm_out")(pooled)


class ResBlock(nn.Module):
  """IF's res block: GN-GELU-(resample)-conv, scale-shift GN-GELU-conv, skip.

  ``resample`` is "down" (2x2 average pool of both paths), "up" (nearest x2
  of both paths) or None. ``emb_act`` applies GELU to the embedding before
  its projection (IF-I; IF-II activates the embedding once, up front).
  """
  features: int
  num_groups: int = 32
  resample: Optional[str] = None
  emb_act: bool = True
  out_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin]; emb: [B, E]
    h = gelu(group_norm(self.num_groups, "norm_0")(x)).astype(self.dtype)
    if self.resample == "down":
      x, h = (nn.avg_pool(t, (2, 2), (2, 2)) for t in (x, h))
    elif self.resample == "up":
      x, h = (jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2) for t in (x, h))
    h = conv(self.features, self.dtype, "conv_0")(h)
    e = gelu(emb) if self.emb_act else emb
    film = dense(2 * self.features, self.dtype, "film")(e.astype(self.dtype))
    scale, shift = jnp.split(film.astype(jnp.float32), 2, axis=-1)  # [B, C]
    h = group_norm(self.num_groups, "norm_1")(h)
    h = h * (1.0 + scale[:, None, None]) + shift[:, None, None]
    h = conv(self.features, self.dtype, "conv_1")(gelu(h).astype(self.dtype))
    if x.shape[-1] != self.features:
      x = conv(self.features, self.dtype, "skip", kernel=1)(x.astype(self.dtype))
    out = (x.astype(jnp.float32) + h.astype(jnp.float32)) / self.out_scale
    return nn.with_logical_constraint(
        out.astype(self.dtype), ("batch", "height", "width", "act_channels"))


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

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array,
               ctx_mask: Optional[jax.Array]) -> jax.Array:
    # x: [B, H, W, C]; ctx: [B, L, cond_dim]; ctx_mask: [B, L] or None
    b, hh, ww, c = x.shape
    heads = c // self.head_dim
    y = group_norm(self.num_groups, "norm")(x).reshape(b, hh * ww, c)
    y = y.astype(self.dtype)
    t = group_norm(self.text_groups, "norm_text")(ctx).astype(self.dtype)

    def proj(name, inp):
      out = dense(c, self.dtype, name, names=("embed", "heads"))(inp)
      return out.reshape(b, inp.shape[1], heads, self.head_dim)

    q = proj("query", y)
    k, v = proj("text_key", t), proj("text_value", t)
    mask = ctx_mask
    if not self.only_cross:
      k = jnp.concatenate([k, proj("key", y)], axis=1)     # [B, L + HW, N, H]
      v = jnp.concatenate([v, proj("value", y)], axis=1)
      if mask is not None:
        mask = jnp.concatenate([mask, jnp.ones((b, hh * ww), bool)], axis=1)
    if mask is not None:
      mask = mask[:, None, None, :]                         # [B, 1, 1, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)   # [B, T, N, H]
    out = dense(c, self.dtype, "out", names=("heads", "embed"))(
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
