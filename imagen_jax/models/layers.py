"""Building blocks of the text-conditioned U-Net, in plain Flax.

Every parameter is created with logical axis names so the training code can
shard it with data / fsdp / tensor rules (see ``imagen_jax.parallel``):

  conv kernels   (None, None, "conv_in", "conv_out")
  dense kernels  ("embed", "mlp") or ("mlp", "embed")
  attention      ("embed", "heads", "kv"): q/k/v projections,
                 ("heads", "kv", "embed"): out
  norms, biases  ("norm",) or the kernel's output axes

Large activations carry ``nn.with_logical_constraint`` with
("batch", "height", "width", "act_channels") or ("batch", "length", ...),
which are no-ops outside a mesh / rules context.

Bias adds, FiLM, GroupNorm (+ FiLM + SiLU) and attention go through the
kernel interface (``imagen_jax.kernels``), selected by each module's
``kernels`` field (``config.model.kernels``); the reference implementation
is the textbook formula, and a backend's faster version lives there.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import kernels as kernels_lib

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


def _add_bias(module: nn.Module, y: jax.Array, shape: tuple[int, ...],
              axes: Sequence[str], activation: Optional[str] = None
              ) -> jax.Array:
  """Creates ``module``'s ``bias`` (``shape``: y's trailing dims) and adds it."""
  bias = module.param("bias", partitioned(ZEROS, tuple(axes)), shape,
                      jnp.float32)
  lead = y.shape[:y.ndim - len(shape)]
  y = kernels_lib.get(module.kernels).bias_add(
      y.reshape(lead + (-1,)), bias.reshape(-1), activation)
  return y.reshape(lead + shape)


class Dense(nn.Module):
  """``nn.DenseGeneral`` with its bias add (and activation) as a kernel.

  The matmul is flax's own layer sharing this module's scope, so the
  parameters are ``nn.Dense`` / ``nn.DenseGeneral``'s: ``kernel [*in,
  *features]`` and ``bias [*features]``, same names, shapes and
  initialisers. The bias add is ``kernels.bias_add``, a backend's choice
  (on XLA:CPU its gradient is the fast channel sum).
  """
  features: Union[int, tuple[int, ...]]
  dtype: Dtype = jnp.float32
  names: tuple = ("embed", "mlp")
  axis: Union[int, tuple[int, ...]] = -1
  kernel_init: Any = DEFAULT_INIT
  activation: Optional[str] = None
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [..., *in] -> [..., *features]
    features = ((self.features,) if isinstance(self.features, int)
                else tuple(self.features))
    linear = nn.DenseGeneral(
        features, axis=self.axis, use_bias=False, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(self.kernel_init, self.names))
    nn.share_scope(self, linear)
    y = linear(x)
    return _add_bias(self, y, features, self.names[-len(features):],
                     self.activation)


def dense(features, dtype: Dtype, *, names=("embed", "mlp"), axis=-1,
          kernel_init=DEFAULT_INIT, activation: Optional[str] = None,
          kernels: str = "auto", name=None) -> Dense:
  """A Dense layer with float32 params, ``dtype`` compute and named axes."""
  return Dense(features, dtype, tuple(names), axis, kernel_init, activation,
               kernels, name=name)


class Conv(nn.Module):
  """SAME-padded ``nn.Conv`` with its bias add as a kernel.

  Parameters are ``nn.Conv``'s (``kernel [k, k, Cin, Cout]``, ``bias
  [Cout]``), for the reason in ``Dense``.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Any = DEFAULT_INIT
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin] -> [B, H / strides, W / strides, Cout]
    k = self.kernel_size
    conv_layer = nn.Conv(
        self.features, (k, k), strides=(self.strides, self.strides),
        padding="SAME", use_bias=False, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(self.kernel_init,
                                (None, None, "conv_in", "conv_out")))
    nn.share_scope(self, conv_layer)
    return _add_bias(self, conv_layer(x), (self.features,), ("conv_out",))


def conv(features: int, dtype: Dtype, *, kernel: int = 3, strides: int = 1,
         kernel_init=DEFAULT_INIT, kernels: str = "auto", name=None) -> Conv:
  """A SAME-padded 2D convolution with named axes."""
  return Conv(features, kernel, strides, dtype, kernel_init, kernels,
              name=name)


class GroupNorm(nn.Module):
  """GroupNorm over ``[B, H, W, C]`` with float32 statistics.

  Optionally fused with FiLM conditioning and a SiLU: ``__call__(x, film,
  activation)`` returns ``act(norm(x) * gamma * (1 + s) + beta * (1 + s) + t)``
  for FiLM ``(s, t)``: the FiLM folds into the norm's affine, so the whole
  chain is one ``kernels.group_norm_act``.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

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
    return kernels_lib.get(self.kernels).group_norm_act(
        x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon,
        activation=activation, dtype=self.dtype)


def group_norm(num_groups: int, dtype: Dtype, kernels: str = "auto",
               name=None) -> GroupNorm:
  """GroupNorm whose statistics are reduced in float32 whatever the dtype."""
  return GroupNorm(num_groups=num_groups, dtype=dtype, kernels=kernels,
                   name=name)


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
  return sinusoidal(t, dim)


def sinusoidal(values: jax.Array, dim: int) -> jax.Array:
  """Transformer sinusoids of scalars (timesteps, positions).

  Args:
    values: ``[N]`` scalars.
    dim: embedding width (even).

  Returns:
    ``[N, dim]`` float32: sines then cosines over geometric frequencies.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = values.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class NoiseLevelMLP(nn.Module):
  """Sinusoidal embedding of a noise level followed by a 2-layer MLP."""
  features: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, logsnr: jax.Array) -> jax.Array:
    emb = noise_level_embedding(logsnr, max(self.features // 4, 32) * 2)
    emb = dense(self.features, self.dtype, activation="silu",
                kernels=self.kernels, name="dense_0")(emb)
    return dense(self.features, self.dtype, names=("mlp", "embed"),
                 kernels=self.kernels, name="dense_1")(emb)


def film_params(channels: int, emb: jax.Array, dtype: Dtype, name: str,
                kernels: str = "auto") -> tuple[jax.Array, jax.Array]:
  """FiLM scale and shift ``[B, C]`` each, projected from ``emb`` ``[B, E]``."""
  params = dense(2 * channels, dtype, kernels=kernels, name=name)(nn.silu(emb))
  scale, shift = jnp.split(params, 2, axis=-1)
  return scale, shift


def film(x: jax.Array, emb: jax.Array, dtype: Dtype, name: str,
         kernels: str = "auto") -> jax.Array:
  """Scale-shift (FiLM) modulation of ``[B, H, W, C]`` features by ``[B, E]``."""
  scale, shift = film_params(x.shape[-1], emb, dtype, name, kernels)
  return kernels_lib.get(kernels).modulate(x, scale, shift)


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
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    # x: [B, H, W, Cin]; emb: [B, E]
    kn = self.kernels
    h = group_norm(self.num_groups, self.dtype, kn, name="norm_0")(
        x, activation="silu")
    h = conv(self.features, self.dtype, kernels=kn, name="conv_0")(h)
    h = constrain_image(h)
    # FiLM folds into the norm's affine: one fused norm-scale-shift-SiLU.
    mod = (film_params(self.features, emb, self.dtype, "film", kn)
           if self.use_film else None)
    h = group_norm(self.num_groups, self.dtype, kn, name="norm_1")(
        h, film=mod, activation="silu")
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    # Zero-init of the last conv makes each block start as the identity.
    h = conv(self.features, self.dtype, kernel_init=ZEROS, kernels=kn,
             name="conv_1")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, self.dtype, kernel=1, kernels=kn, name="skip")(x)
    return constrain_image(x + h)


class Downsample(nn.Module):
  """Strided 3x3 convolution: halves H and W, sets the width."""
  features: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain_image(conv(self.features, self.dtype, strides=2,
                                kernels=self.kernels, name="conv")(x))


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
  adds per low-res pixel and channel pair, on any backend, and the 4x larger
  upsampled activation is never materialised, in the forward pass or the
  backward (which otherwise sums the upsampled gradient back over 2x2
  blocks); see benchmarks/upsample_speed.py.
  """
  features: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape  # [B, H, W, Cin]
    kernel = self.param("kernel", partitioned(
        DEFAULT_INIT, (None, None, "conv_in", "conv_out")),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
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
    out = out.reshape(b, 2 * h, 2 * w, self.features)
    return _add_bias(self, out, (self.features,), ("conv_out",))


class Upsample(nn.Module):
  """Nearest-neighbour x2 followed by a 3x3 convolution.

  Computed without materialising the upsampled image (see
  ``_NearestUpsampleConv``); the parameters are those of the plain version.
  """
  features: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain_image(_NearestUpsampleConv(
        self.features, self.dtype, self.kernels, name="conv")(x))


class UpsampleReference(nn.Module):
  """The textbook ``Upsample``: materialise the nearest x2 image, then convolve.

  Same parameters as ``Upsample``; kept as the reference it is tested and
  benchmarked against (tests/test_unet.py, benchmarks/upsample_speed.py).
  """
  features: int
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return conv(self.features, self.dtype, kernels=self.kernels, name="conv")(
        x.reshape(b, 2 * h, 2 * w, c))  # [B, 2H, 2W, Cout]


class Attention(nn.Module):
  """Multi-head attention from ``x`` to a context (itself when None).

  The inner width (heads x head_dim) is the narrower of the query and context
  widths: keys and values projected from a D-wide context have rank <= D, so
  a wider inner space would add parameters and FLOPs but no capacity.

  Parameters are ``nn.DenseGeneral``'s (``query``, ``key``, ``value``:
  ``[D, N, H]`` kernels; ``out``: ``[N, H, C]``); the softmax is float32
  whatever the compute dtype (``kernels.attention``).
  """
  head_dim: int = 64
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    # x: [B, T, C]; context: [B, S, D]; mask: [B, S]
    width = x.shape[-1]
    context = x if context is None else context
    inner = min(width, context.shape[-1])
    heads = max(inner // self.head_dim, 1)
    head_dim = inner // heads

    def project(name, inp):
      return dense((heads, head_dim), self.dtype, names=("embed", "heads", "kv"),
                   kernels=self.kernels, name=name)(inp)  # [B, T|S, N, H]

    q = project("query", x)
    k = project("key", context)
    v = project("value", context)
    out = kernels_lib.get(self.kernels).attention(q, k, v, mask)  # [B, T, N, H]
    return dense(width, self.dtype, names=("heads", "kv", "embed"),
                 axis=(-2, -1), kernel_init=ZEROS, kernels=self.kernels,
                 name="out")(out)                                 # [B, T, C]


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
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array) -> jax.Array:
    # x: [B, H, W, C]; context: [B, S, D]; context_mask: [B, S]
    b, h, w, c = x.shape
    kn = self.kernels
    if self.self_attn:
      y = group_norm(self.num_groups, self.dtype, kn, name="norm_self")(x)
      y = Attention(self.head_dim, self.dtype, kn, name="self")(
          y.reshape(b, h * w, c))
      x = constrain_image(x + y.reshape(b, h, w, c))
    if self.cross_attn:
      y = group_norm(self.num_groups, self.dtype, kn, name="norm_cross")(x)
      y = Attention(self.head_dim, self.dtype, kn, name="cross")(
          y.reshape(b, h * w, c), context, context_mask)
      x = constrain_image(x + y.reshape(b, h, w, c))
    if self.ff_mult:
      y = group_norm(self.num_groups, self.dtype, kn, name="norm_ff")(x)
      y = dense(c * self.ff_mult, self.dtype, activation="gelu", kernels=kn,
                name="ff_in")(y)
      y = dense(c, self.dtype, names=("mlp", "embed"), kernel_init=ZEROS,
                kernels=kn, name="ff_out")(y)
      x = constrain_image(x + y)
    return x


class AttentionPool(nn.Module):
  """Pools a masked token sequence into one vector with a learned query."""
  features: int
  head_dim: int = 64
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    # tokens: [B, S, D]; mask: [B, S] -> [B, features]
    b, _, d = tokens.shape
    query = self.param("query", partitioned(nn.initializers.normal(0.02),
                                            (None, "embed")), (1, d))
    query = jnp.broadcast_to(query[None].astype(self.dtype), (b, 1, d))
    # The query attends over the tokens and its own mean-free seed: the mean
    # of the masked tokens is added so the pool sees content even at init.
    pooled = Attention(self.head_dim, self.dtype, self.kernels, name="attn")(
        query, tokens, mask)[:, 0]
    denom = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
    mean = jnp.sum(tokens.astype(jnp.float32) * mask[..., None], axis=1) / denom
    pooled = layer_norm(self.dtype, name="norm")(pooled + mean.astype(pooled.dtype))
    return dense(self.features, self.dtype, kernels=self.kernels,
                 name="proj")(pooled)


class TextTransformer(nn.Module):
  """Trainable pre-norm Transformer layers over the frozen text embeddings.

  The frozen encoder's tokens are what the U-Net's cross-attention keys are
  made of; when they carry little word order (a random-weight or small
  encoder), cross-attention sees nearly a bag of words and cannot bind
  "left of" to the right object. These layers add sinusoidal positions and
  let the stage learn that mixing. Residual branches end in zero-initialised
  projections, so the layers start as the identity; masked tokens are never
  attended to.
  """
  num_layers: int
  head_dim: int = 64
  ff_mult: int = 2
  dtype: Dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    # x: [B, L, D]; mask: [B, L] bool
    d = x.shape[-1]
    pos = sinusoidal(jnp.arange(x.shape[1]), d + d % 2)[:, :d]  # [L, D]
    x = x + pos[None].astype(x.dtype)
    for i in range(self.num_layers):
      y = layer_norm(self.dtype, name=f"norm_attn_{i}")(x)
      x = x + Attention(self.head_dim, self.dtype, self.kernels,
                        name=f"attn_{i}")(y, y, mask)
      y = layer_norm(self.dtype, name=f"norm_ff_{i}")(x)
      y = dense(d * self.ff_mult, self.dtype, activation="gelu",
                kernels=self.kernels, name=f"ff_in_{i}")(y)
      x = x + dense(d, self.dtype, names=("mlp", "embed"), kernel_init=ZEROS,
                    kernels=self.kernels, name=f"ff_out_{i}")(y)
    return constrain_seq(x)
