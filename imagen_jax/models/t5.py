"""T5 v1.1 encoder in Flax with t5x's parameter names and shapes.

The parameter tree mirrors the ``target`` tree of t5x's T5 v1.1 checkpoints
(t5x/examples/t5/network.py), so a t5x checkpoint restores into it with no
renaming. Only the encoder half is kept:

  token_embedder/embedding                          [vocab, d_model]
  encoder/relpos_bias/rel_embedding                 [heads, num_buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale [d_model]
  encoder/layers_{i}/attention/query/kernel         [d_model, heads * head_dim]
  encoder/layers_{i}/attention/key/kernel           [d_model, heads * head_dim]
  encoder/layers_{i}/attention/value/kernel         [d_model, heads * head_dim]
  encoder/layers_{i}/attention/out/kernel           [heads * head_dim, d_model]
  encoder/layers_{i}/pre_mlp_layer_norm/scale       [d_model]
  encoder/layers_{i}/mlp/wi_0/kernel                [d_model, d_ff]   (gated)
  encoder/layers_{i}/mlp/wi_1/kernel                [d_model, d_ff]   (gated)
  encoder/layers_{i}/mlp/wi/kernel                  [d_model, d_ff]   (T5 1.0)
  encoder/layers_{i}/mlp/wo/kernel                  [d_ff, d_model]
  encoder/encoder_norm/scale                        [d_model]

T5 details kept exactly: RMS LayerNorm without mean subtraction or bias;
no 1/sqrt(d) logit scaling (t5x folds it into the query init); bidirectional
bucketed relative position bias computed once and shared by all layers; gated
GELU (tanh approximation, "gelu_new") MLP; no biases anywhere.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.models import layers


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 encoder."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_ff: int = 10240
  num_heads: int = 64
  head_dim: int = 64
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  layer_norm_eps: float = 1e-6
  gated: bool = True
  activation: str = "gelu"   # "gelu" (tanh approximation) or "relu"
  dtype: str = "float32"     # compute dtype; params are float32

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Published T5 v1.1 sizes (encoder side); "tiny" and "demo" are ours, for tests
# and the embedded default, with random weights.
T5_SIZES: dict[str, T5Config] = {
    "small": T5Config(d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    "base": T5Config(d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    "large": T5Config(d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "xl": T5Config(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": T5Config(d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
    "demo": T5Config(vocab_size=1024, d_model=256, d_ff=512, num_heads=4,
                     num_layers=4),
    "tiny": T5Config(vocab_size=1024, d_model=32, d_ff=64, num_heads=4,
                     head_dim=8, num_layers=2),
}


def t5_config(size: str, **overrides) -> T5Config:
  """The config of a named T5 size, with optional field overrides."""
  if size not in T5_SIZES:
    raise ValueError(f"Unknown T5 size {size!r}; choose one of "
                     f"{', '.join(T5_SIZES)}.")
  return dataclasses.replace(T5_SIZES[size], **overrides)


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional bucketing of key - query distances.

  Half the buckets are for keys after the query. Within a half, distances
  below num_buckets / 4 get a bucket each; larger ones share log-spaced
  buckets up to max_distance, beyond which all fall in the last bucket.

  Returns:
    ``[query_len, key_len]`` int32 bucket ids (host-side; shapes are static).
  """
  rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int32) * half
  n = np.abs(rel)
  max_exact = half // 2
  is_small = n < max_exact
  # The epsilon (as in mesh-tf / t5x) keeps exact powers from landing a bucket
  # low through float rounding; float32 math matches both references.
  large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (half - max_exact)).astype(np.int32)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, n, large)).astype(np.int32)


class RMSNorm(nn.Module):
  """T5 LayerNorm: scale only, no centring, statistics in float32."""
  eps: float = 1e-6
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", layers.partitioned(nn.initializers.ones_init(),
                                                   ("embed",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True)
                              + self.eps)
    return (x32 * scale).astype(self.dtype)


def _dense(features: int, dtype, names, name: str, std: float) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype,
                  param_dtype=jnp.float32,
                  kernel_init=layers.partitioned(
                      nn.initializers.normal(std), names), name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention with an additive position bias (no scaling)."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    # x: [B, L, D]; bias: [B, N, L, L] (position bias + padding mask)
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    inner = cfg.num_heads * cfg.head_dim
    b, length, d = x.shape
    # t5x's init: the 1/sqrt(head_dim) logit scale lives in the query init.
    q = _dense(inner, dtype, ("embed", "joined_kv"), "query",
               (d * cfg.head_dim) ** -0.5)(x)
    k = _dense(inner, dtype, ("embed", "joined_kv"), "key", d ** -0.5)(x)
    v = _dense(inner, dtype, ("embed", "joined_kv"), "value", d ** -0.5)(x)
    q, k, v = (t.reshape(b, length, cfg.num_heads, cfg.head_dim)
               .transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, N, L, H]
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k,
                        preferred_element_type=jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bnqk,bnkh->bnqh", weights, v)
    out = out.transpose(0, 2, 1, 3).reshape(b, length, inner)
    return _dense(d, dtype, ("joined_kv", "embed"), "out", inner ** -0.5)(out)


class Mlp(nn.Module):
  """Gated-GELU (v1.1) or ReLU (1.0) feed-forward block."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    d = x.shape[-1]
    act = (lambda h: nn.gelu(h, approximate=True)) if cfg.activation == "gelu" \
        else nn.relu
    if cfg.gated:
      h = act(_dense(cfg.d_ff, dtype, ("embed", "mlp"), "wi_0", d ** -0.5)(x))
      h = h * _dense(cfg.d_ff, dtype, ("embed", "mlp"), "wi_1", d ** -0.5)(x)
    else:
      h = act(_dense(cfg.d_ff, dtype, ("embed", "mlp"), "wi", d ** -0.5)(x))
    return _dense(d, dtype, ("mlp", "embed"), "wo", cfg.d_ff ** -0.5)(h)


class EncoderLayer(nn.Module):
  """Pre-norm residual self-attention + MLP."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    y = RMSNorm(cfg.layer_norm_eps, cfg.dtype, name="pre_attention_layer_norm")(x)
    x = x + SelfAttention(cfg, name="attention")(y, bias)
    y = RMSNorm(cfg.layer_norm_eps, cfg.dtype, name="pre_mlp_layer_norm")(x)
    return layers.constrain_seq(x + Mlp(cfg, name="mlp")(y))


class Encoder(nn.Module):
  """The encoder stack (t5x's ``encoder`` subtree)."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    b, length, _ = x.shape
    rel_embedding = RelativePositionBias(cfg, name="relpos_bias")(length)
    # Padding: keys that are padding get a large negative bias. float32.min
    # keeps a fully padded row finite (it then attends uniformly; its output
    # is masked downstream anyway).
    pad = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    bias = rel_embedding[None] + pad  # [B, N, L, L]
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
    return RMSNorm(cfg.layer_norm_eps, cfg.dtype, name="encoder_norm")(x)


class RelativePositionBias(nn.Module):
  """Bucketed relative position bias ``[heads, L, L]`` (shared by all layers)."""
  config: T5Config

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    cfg = self.config
    table = self.param("rel_embedding", layers.partitioned(
        nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
                       (cfg.num_heads, cfg.num_buckets))
    buckets = relative_position_buckets(length, length, cfg.num_buckets,
                                        cfg.max_distance)
    return table[:, buckets].astype(jnp.float32)  # [N, L, L]


class T5Encoder(nn.Module):
  """Token ids ``[B, L]`` + mask ``[B, L]`` -> embeddings ``[B, L, D]``."""
  config: T5Config

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.float32,
                     embedding_init=layers.partitioned(
                         nn.initializers.normal(1.0), ("vocab", "embed")),
                     name="token_embedder")
    x = layers.constrain_seq(embed(tokens.astype(jnp.int32)))
    x = Encoder(cfg, name="encoder")(x, mask.astype(bool))
    return x.astype(jnp.float32)


def count_encoder_params(config: T5Config) -> int:
  """Parameter count of the encoder (closed form, matches eval_shape)."""
  d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.head_dim
  per_layer = 4 * d * inner + (3 if config.gated else 2) * d * ff + 2 * d
  return (config.vocab_size * d + config.num_layers * per_layer + d
          + config.num_heads * config.num_buckets)
