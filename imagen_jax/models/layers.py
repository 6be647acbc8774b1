"""Building blocks of the text-conditioned U-Net.

Every parameter is created with logical axis names so the training code can
shard it with data / fsdp / tensor rules (see ``imagen_jax.parallel``):

  conv kernels   (None, None, "conv_in", "conv_out")
  dense kernels  ("embed", "mlp") or ("mlp", "embed")
  attention      ("embed", "heads"): q/k/v projections, ("heads", "embed"): out
  norms, biases  ("norm",)

Large activations carry ``nn.with_logical_constraint`` with
("batch", "height", "width", "act_channels") or ("batch", "length", ...),
which are no-ops outside a mesh / rules context.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models.attention_core import attend
from imagen_jax.models.channel_sum import add_bias
from imagen_jax.models.channel_sum import bias_gelu
from imagen_jax.models.channel_sum import modulate
from imagen_jax.models.group_norm import group_norm_act

Dtype = Any

DEFAULT_INIT = nn.initializers.lecun_normal()
ZEROS = nn.initializers.zeros_init()
ONES = nn.initializers.ones_init()

IMAGE_AXES = ("batch", "height", "width", "act_channels")
SEQ_AXES = ("batch", "length", "act_embed")


def partitioned(init, names):
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, names)


def constrain_image(x: jax.Array) -> jax.Array:
  """Logical sharding constraint for ``[B, H, W, C]`` activations."""
  return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_seq(x: jax.Array) -> jax.Array:
  """Logical sharding constraint for ``[B, L, D]`` activations."""
  return nn.with_logical_constraint(x, SEQ_AXES)


class Dense(nn.Module):
  """``x @ kernel + bias`` (optionally GELU'd) with ``nn.Dense``'s parameters.

  Same ``kernel [Cin, Cout]`` / ``bias [Cout]`` names, shapes and
  initialisers as ``nn.Dense``, so checkpoints are unchanged; the bias goes
  through ``add_bias`` (or ``bias_gelu`` with ``activation="gelu"``) for the
  fast channel-sum gradient on XLA:CPU.
  """
  features: int
  dtype: Dtype = jnp.float32
  names: tuple = ("embed", "mlp")
  kernel_init: Any = DEFAULT_INIT
  use_bias: bool = True
  activation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [..., Cin] -> [..., Cout]
    if self.activation not in (None, "gelu"):
      raise ValueError(f"Dense: activation={self.activation!r}; use None or "
                       "'gelu'.")
    kernel = self.param("kernel", partitioned(self.kernel_init, self.names),
                        (x.shape[-1], self.features), jnp.float32)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    if not self.use_bias:
      return nn.gelu(y) if self.activation == "gelu" else y
    bias = self.param("bias", partitioned(ZEROS, (self.names[-1],)),
                      (self.features,), jnp.float32)
    if self.activation == "gelu":
      return bias_gelu(y, bias)
    return add_bias(y, bias)


def dense(features: int, dtype: Dtype, *, names=("embed", "mlp"),
          kernel_init=DEFAULT_INIT, use_bias: bool = True,
          activation: Optional[str] = None, name=None) -> Dense:
  """A Dense layer with float32 params, ``dtype`` compute and named axes."""
  return Dense(features, dtype, tuple(names), kernel_init, use_bias,
               activation, name=name)


class Conv(nn.Module):
  """SAME-padded 2D convolution with ``nn.Conv``'s parameters and math.

  Own module (same ``kernel [k, k, Cin, Cout]`` and ``bias [Cout]`` names,
  shapes and initialisers as ``nn.Conv``, so checkpoints are unchanged) only
  so that the bias goes through ``bias.add_bias``, whose gradient is the fast
  channel sum on XLA:CPU.
  """
  features: int
  kernel: int = 3
  strides: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Any = DEFAULT_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin] -> [B, H / strides, W / strides, Cout]
    k = self.kernel
    kernel = self.param("kernel", partitioned(
        self.kernel_init, (None, None, "conv_in", "conv_out")),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", partitioned(ZEROS, ("conv_out",)),
                      (self.features,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        (self.strides, self.strides), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return add_bias(y, bias)


def conv(features: int, dtype: Dtype, *, kernel: int = 3, strides: int = 1,
         kernel_init=DEFAULT_INIT, name=None) -> Conv:
  """A SAME-padded 2D convolution with named axes."""
  return Conv(features, kernel, strides, dtype, kernel_init, name=name)


class GroupNorm(nn.Module):
  """GroupNorm over ``[B, H, W, C]`` with float32 statistics.

  Optionally fused with FiLM conditioning and a SiLU: ``__call__(x, film,
  activation)`` returns ``act(norm(x) * gamma * (1 + s) + beta * (1 + s) + t)``
  for FiLM ``(s, t)``, computed by ``group_norm.group_norm_act`` whose
  hand-written backward pass replaces the several full-size reductions of
  autodiff with two (about 2x faster training steps on XLA:CPU).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               film: Optional[tuple[jax.Array, jax.Array]] = None,
               activation: Optional[str] = None) -> jax.Array:
    # x: [B, H, W, C]; film: ([B, C], [B, C]) scale and shift
    c = x.shape[-1]
    scale = self.param("scale", partitioned(ONES, ("norm",)), (c,))
    bias = self.param("bias", partitioned(ZEROS, ("norm",)), (c,))
    if film is not None:
      film_scale, film_shift = (f.astype(jnp.float32) for f in film)
      bias = bias * (1.0 + film_scale) + film_shift   # [B, C]
      scale = scale * (1.0 + film_scale)              # [B, C]
    return group_norm_act(x, scale, bias, num_groups=self.num_groups,
                          epsilon=self.epsilon, activation=activation,
                          dtype=self.dtype)


def group_norm(num_groups: int, dtype: Dtype, name=None) -> GroupNorm:
  """GroupNorm whose statistics are reduced in float32 whatever the dtype."""
  return GroupNorm(num_groups=num_groups, dtype=dtype, name=name)


def layer_norm(dtype: Dtype, name=None) -> nn.LayerNorm:
  """LayerNorm with float32 statistics and named axes."""
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, epsilon=1e-5,
                      scale_init=partitioned(ONES, ("norm",)),
                      bias_init=partitioned(ZEROS, ("norm",)), name=name)


def noise_level_embedding(logsnr: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of a log-SNR noise level.

  log-SNR is first mapped to t' = atan(exp(-logsnr / 2)) / (pi / 2) in (0, 1)
  (the time of the truncated-cosine schedule with that level), then embedded as
  a DDPM timestep 1000 t'. This spreads the [-20, 20] range evenly over the
  frequencies instead of wasting most of them on the extremes.

  Args:
    logsnr: ``[B]`` noise levels.
    dim: embedding width (even).

  Returns:
    ``[B, dim]`` float32 embedding.
  """
  logsnr = jnp.clip(logsnr.astype(jnp.float32), -20.0, 20.0)
  t = jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * math.pi) * 1000.0
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class NoiseLevelMLP(nn.Module):
  """Sinusoidal embedding of a noise level followed by a 2-layer MLP."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, logsnr: jax.Array) -> jax.Array:
    emb = noise_level_embedding(logsnr, max(self.features // 4, 32) * 2)
    emb = dense(self.features, self.dtype, name="dense_0")(emb)
    emb = nn.silu(emb)
    return dense(self.features, self.dtype, names=("mlp", "embed"),
                 name="dense_1")(emb)


def film_params(channels: int, emb: jax.Array, dtype: Dtype, name: str
                ) -> tuple[jax.Array, jax.Array]:
  """FiLM scale and shift ``[B, C]`` each, projected from ``emb`` ``[B, E]``."""
  params = dense(2 * channels, dtype, name=name)(nn.silu(emb))
  scale, shift = jnp.split(params, 2, axis=-1)
  return scale, shift


def film(x: jax.Array, emb: jax.Array, dtype: Dtype, name: str) -> jax.Array:
  """Scale-shift (FiLM) modulation of ``[B, H, W, C]`` features by ``[B, E]``."""
  scale, shift = film_params(x.shape[-1], emb, dtype, name)
  return modulate(x, scale, shift)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv residual block, optionally FiLM-conditioned.

  The skip path is a 1x1 convolution when the width changes. With
  ``use_film=False`` the block is unconditioned: the Efficient U-Net combines
  the embedding once per D/U block instead (``CombineEmbs``).
  """
  features: int
  num_groups: int = 32
  dropout: float = 0.0
  use_film: bool = True
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin]; emb: [B, E]
    h = group_norm(self.num_groups, self.dtype, name="norm_0")(
        x, activation="silu")
    h = conv(self.features, self.dtype, name="conv_0")(h)
    h = constrain_image(h)
    # FiLM folds into the norm's affine: one fused norm-scale-shift-SiLU.
    mod = (film_params(self.features, emb, self.dtype, "film")
           if self.use_film else None)
    h = group_norm(self.num_groups, self.dtype, name="norm_1")(
        h, film=mod, activation="silu")
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    # Zero-init of the last conv makes each block start as the identity.
    h = conv(self.features, self.dtype, kernel_init=ZEROS, name="conv_1")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, self.dtype, kernel=1, name="skip")(x)
    return constrain_image(x + h)


class Downsample(nn.Module):
  """Strided 3x3 convolution: halves H and W, sets the width."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain_image(conv(self.features, self.dtype, strides=2,
                                name="conv")(x))


def _nearest_phase_taps(kernel: jax.Array, phase: int, axis: int) -> jax.Array:
  """Folds 3 kernel taps along ``axis`` into the 2 that one output phase sees.

  After nearest x2 upsampling, output row ``2i + phase`` of a 3-tap SAME
  convolution reads low-res rows ``i - 1, i, i`` (phase 0) or ``i, i, i + 1``
  (phase 1): taps that land on the same low-res row add up.
  """
  k0, k1, k2 = (jax.lax.index_in_dim(kernel, i, axis, keepdims=False)
                for i in range(3))
  pair = (k0, k1 + k2) if phase == 0 else (k0 + k1, k2)
  return jnp.stack(pair, axis=axis)


class _NearestUpsampleConv(nn.Module):
  """3x3 SAME convolution of the nearest x2 upsampled input, at low resolution.

  The same function and the same parameters (``kernel [3, 3, Cin, Cout]``,
  ``bias``) as ``nn.Conv`` applied to the upsampled image, computed as four
  2x2 convolutions of the low-res input, one per output phase (row parity x
  column parity), interleaved at the end. That is 16 instead of 36 multiply-
  adds per low-res pixel and channel pair, and the 4x larger upsampled
  activation is never materialised, in the forward pass or the backward
  (which otherwise sums the upsampled gradient back over 2x2 blocks): the
  upsampling layers' forward+backward runs mostly 1.2-2.4x faster on CPU
  (benchmarks/upsample_speed.py; RESULTS.md).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape  # [B, H, W, Cin]
    kernel = self.param("kernel", partitioned(
        DEFAULT_INIT, (None, None, "conv_in", "conv_out")),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", partitioned(ZEROS, ("conv_out",)),
                      (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    rows = []
    for a in (0, 1):
      k_a = _nearest_phase_taps(kernel, a, 0)
      cols = []
      for c in (0, 1):
        k_ac = _nearest_phase_taps(k_a, c, 1)  # [2, 2, Cin, Cout]
        pad = ((1, 0) if a == 0 else (0, 1), (1, 0) if c == 0 else (0, 1))
        cols.append(jax.lax.conv_general_dilated(
            x, k_ac, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")))
      rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2, Cout]
    out = jnp.stack(rows, axis=2)  # [B, H, 2, W, 2, Cout]
    return add_bias(out.reshape(b, 2 * h, 2 * w, self.features), bias)


class Upsample(nn.Module):
  """Nearest-neighbour x2 followed by a 3x3 convolution.

  Computed without materialising the upsampled image (see
  ``_NearestUpsampleConv``); the parameters are those of the plain version.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain_image(_NearestUpsampleConv(self.features, self.dtype,
                                                name="conv")(x))


class UpsampleReference(nn.Module):
  """The textbook ``Upsample``: materialise the nearest x2 image, then convolve.

  Same parameters as ``Upsample``; kept as the reference it is tested and
  benchmarked against (tests/test_unet.py, benchmarks/upsample_speed.py).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return conv(self.features, self.dtype, name="conv")(
        x.reshape(b, 2 * h, 2 * w, c))  # [B, 2H, 2W, Cout]


class _ProjectionParams(nn.Module):
  """Creates ``kernel`` and ``bias`` as ``nn.DenseGeneral`` does.

  Same names and shapes, and the same initial values: like DenseGeneral the
  kernel is drawn as a ``[prod(inputs), prod(features)]`` matrix (which sets
  the fan-in of the initialiser) and reshaped.
  """
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_shape: tuple[int, ...]
  bias_axes: tuple[str, ...]
  input_dims: int = 1
  kernel_init: Any = DEFAULT_INIT

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    def flat_init(key, shape, dtype=jnp.float32):
      flat = (math.prod(shape[:self.input_dims]),
              math.prod(shape[self.input_dims:]))
      return self.kernel_init(key, flat, dtype).reshape(shape)

    kernel = self.param("kernel", partitioned(flat_init, self.kernel_axes),
                        self.kernel_shape, jnp.float32)
    bias = self.param("bias", partitioned(ZEROS, self.bias_axes),
                      self.bias_shape, jnp.float32)
    return kernel, bias


def _project(x: jax.Array, kernel: jax.Array, bias: jax.Array,
             dtype: Dtype) -> jax.Array:
  """``[B, T, C] x [C, N, H] + [N, H] -> [B, T, N, H]`` in ``dtype``."""
  b, t, _ = x.shape
  _, n, h = kernel.shape
  y = jnp.einsum("btc,cnh->btnh", x.astype(dtype), kernel.astype(dtype))
  return add_bias(y.reshape(b, t, n * h), bias.reshape(n * h)).reshape(
      b, t, n, h)


class Attention(nn.Module):
  """Multi-head attention from ``x`` to a context (itself when None).

  The inner width (heads x head_dim) is the narrower of the query and context
  widths: keys and values projected from a D-wide context have rank <= D, so
  a wider inner space would add parameters and FLOPs but no capacity.

  Parameters and initial values are ``nn.DenseGeneral``'s (``query``,
  ``key``, ``value``, ``out``); the projection biases go through
  ``add_bias`` for the fast channel-sum gradient. (One fused q/k/v matmul
  was measured too: no faster on XLA:CPU, slower at 8x8.)
  """
  head_dim: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    # x: [B, T, C]; context: [B, S, D]; mask: [B, S]
    width = x.shape[-1]
    context = x if context is None else context
    inner = min(width, context.shape[-1])
    heads = max(inner // self.head_dim, 1)
    head_dim = inner // heads

    def params(name, in_features):
      return _ProjectionParams((in_features, heads, head_dim),
                               ("embed", "heads", "kv"), (heads, head_dim),
                               ("heads", "kv"), name=name)()

    q = _project(x, *params("query", width), self.dtype)  # [B, T, N, H]
    k = _project(context, *params("key", context.shape[-1]), self.dtype)
    v = _project(context, *params("value", context.shape[-1]), self.dtype)
    out = attend(q, k, v, mask)                         # [B, T, N, H]
    wo, bo = _ProjectionParams((heads, head_dim, width),
                               ("heads", "kv", "embed"), (width,),
                               ("embed",), input_dims=2, kernel_init=ZEROS,
                               name="out")()
    y = jnp.einsum("btnh,nhc->btc", out, wo.astype(self.dtype))
    return add_bias(y, bo)


class AttentionBlock(nn.Module):
  """Self-attention and/or masked text cross-attention (+ optional MLP).

  Each sub-layer is pre-normalised (GroupNorm for image tokens; the text
  context arrives LayerNorm'ed from the U-Net) and residual with a
  zero-initialised output projection.
  """
  self_attn: bool = True
  cross_attn: bool = True
  head_dim: int = 64
  ff_mult: int = 0
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array) -> jax.Array:
    # x: [B, H, W, C]; context: [B, S, D]; context_mask: [B, S]
    b, h, w, c = x.shape
    if self.self_attn:
      y = group_norm(self.num_groups, self.dtype, name="norm_self")(x)
      y = Attention(self.head_dim, self.dtype, name="self")(
          y.reshape(b, h * w, c))
      x = constrain_image(x + y.reshape(b, h, w, c))
    if self.cross_attn:
      y = group_norm(self.num_groups, self.dtype, name="norm_cross")(x)
      y = Attention(self.head_dim, self.dtype, name="cross")(
          y.reshape(b, h * w, c), context, context_mask)
      x = constrain_image(x + y.reshape(b, h, w, c))
    if self.ff_mult:
      y = group_norm(self.num_groups, self.dtype, name="norm_ff")(x)
      y = dense(c * self.ff_mult, self.dtype, activation="gelu",
                name="ff_in")(y)
      y = dense(c, self.dtype, names=("mlp", "embed"), kernel_init=ZEROS,
                name="ff_out")(y)
      x = constrain_image(x + y)
    return x


class AttentionPool(nn.Module):
  """Pools a masked token sequence into one vector with a learned query."""
  features: int
  head_dim: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    # tokens: [B, S, D]; mask: [B, S] -> [B, features]
    b, _, d = tokens.shape
    query = self.param("query", partitioned(nn.initializers.normal(0.02),
                                            (None, "embed")), (1, d))
    query = jnp.broadcast_to(query[None].astype(self.dtype), (b, 1, d))
    # The query attends over the tokens and its own mean-free seed: the mean
    # of the masked tokens is added so the pool sees content even at init.
    pooled = Attention(self.head_dim, self.dtype, name="attn")(query, tokens,
                                                               mask)[:, 0]
    denom = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
    mean = jnp.sum(tokens.astype(jnp.float32) * mask[..., None], axis=1) / denom
    pooled = layer_norm(self.dtype, name="norm")(pooled + mean.astype(pooled.dtype))
    return dense(self.features, self.dtype, name="proj")(pooled)
