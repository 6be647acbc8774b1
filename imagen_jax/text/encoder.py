"""``TextEncoder``: a frozen T5 encoder with its vocabulary, ready to encode text.

Every encoder carries a *spec* (a JSON-able dict: T5 size and dims, where the
weights came from — a t5x or Hugging Face checkpoint path or a random-init
seed —, the vocabulary path and its SHA-256, and the max length). Embedding
stores and training workdirs record it, so sampling rebuilds the same encoder
with no extra flags (``TextEncoder.from_spec``) and refuses a mismatched one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imagen_jax import config_defaults
from imagen_jax import fileio
from imagen_jax import parallel
from imagen_jax.models import t5 as t5_lib
from imagen_jax.text import t5_checkpoints
from imagen_jax.text import vocab as vocab_lib

DEFAULT_MAX_LENGTH = 128  # the paper's

SPEC_IDENTITY_KEYS = ("t5", "source", "checkpoint", "seed", "random_init",
                      "vocab_sha256", "max_length", "conditioning")

# How captions become the U-Net's text conditioning (the spec's
# "conditioning"; a property of the stages that read it, so it travels with
# their encoder record):
#   masked  ours: embeddings past each caption are zero and masked out; the
#           null text (guidance's unconditional branch) is all zeros, all
#           masked.
#   full    DeepFloyd IF's pipeline: captions lowercased and stripped, T5's
#           outputs at all max_length positions (padding included), every
#           position visible (IF's U-Net takes no text mask); the null text
#           is T5 of the empty caption (EOS, then padding).
CONDITIONINGS = ("masked", "full")

# How a random-weight encoder is initialised (``config.text.random_init``):
#   t5     T5's own initialisation (what t5x trains from). At random weights
#          its attention is nearly uniform, so every token's output is itself
#          plus the caption's mean: close to a bag of words, and captions that
#          differ only in word order get near-identical embeddings.
#   local  the same weights, but each head's relative-position bias selects
#          one relative offset (-1, +1, -2, +2, ...): every layer mixes each
#          token with fixed neighbours through random projections, so the
#          frozen encoder's outputs carry word order and which words stand
#          together ("red" next to "circle"), as a trained T5's do.
RANDOM_INITS = config_defaults.RANDOM_INITS  # declared with the config schema


def tokenize(vocab, texts: Sequence[str], max_length: int,
             empty_is_null: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
  """Tokenizes, appends EOS and trims to ``max_length`` (EOS kept last).

  Args:
    vocab: a seqio vocabulary.
    texts: captions; "" is the null text (all padding) when
      ``empty_is_null``, else a caption of EOS alone.
    max_length: tokens per example including EOS.
    empty_is_null: see ``texts``.

  Returns:
    (ids ``[B, max_length]`` int32, mask ``[B, max_length]`` bool, number of
    texts that were truncated).
  """
  ids = np.zeros((len(texts), max_length), np.int32)
  truncated = 0
  for i, text in enumerate(texts):
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if not text and empty_is_null:
      continue  # null text: no tokens at all, not even EOS
    toks = list(vocab.encode(text))
    if len(toks) + 1 > max_length:
      truncated += 1
      toks = toks[:max_length - 1]
    toks.append(vocab.eos_id)
    ids[i, :len(toks)] = toks
  return ids, ids != 0, truncated


@dataclasses.dataclass
class TextEncoder:
  """A T5 encoder, its params, vocabulary and max length.

  Attributes:
    config: T5 sizes and compute dtype.
    params: encoder params (t5x names), possibly sharded over ``mesh``.
    vocab: seqio SentencePiece vocabulary.
    max_length: tokens per caption (incl. EOS); longer ones are truncated.
    spec: provenance (see module docstring).
    mesh: the device mesh params live on.
  """
  config: t5_lib.T5Config
  params: Any
  vocab: Any
  max_length: int
  spec: dict
  mesh: Mesh

  # --- construction -------------------------------------------------------------

  @classmethod
  def _build(cls, config, host_params, vocab_path, max_length, spec, mesh,
             rules=parallel.DEFAULT_RULES):
    vocab = vocab_lib.load_vocabulary(vocab_path)
    if vocab.vocab_size > config.vocab_size:
      raise ValueError(f"Vocabulary {vocab_path!r} has {vocab.vocab_size} "
                       f"pieces but the T5 embedding has {config.vocab_size}; "
                       "use the vocabulary the checkpoint was trained with.")
    mesh = mesh or parallel.make_mesh((1, -1, 1), jax.local_devices())
    module = t5_lib.T5Encoder(config)
    boxed = _abstract_boxed(module)
    shardings = parallel.param_shardings(boxed, mesh, rules)
    if host_params is None:  # random init, directly into its sharding
      local = spec.get("random_init", "t5") == "local"

      def init_fn(rng):
        params = nn.unbox(module.init(rng, jnp.zeros((1, 8), jnp.int32),
                                      jnp.ones((1, 8), bool)))["params"]
        if local:
          params["encoder"]["relpos_bias"]["rel_embedding"] = jnp.asarray(
              local_position_bias(config))
        return params

      init = jax.jit(init_fn, out_shardings=shardings["params"])
      params = init(jax.random.PRNGKey(int(spec["seed"])))
    else:
      _check_param_shapes(host_params, nn.unbox(boxed)["params"],
                          spec.get("checkpoint", ""))
      params = jax.tree_util.tree_map(
          lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
          host_params, shardings["params"])
    spec = dict(spec, vocab=vocab_path, max_length=int(max_length),
                vocab_sha256=vocab_lib.vocab_sha256(vocab_path),
                config=config.to_dict())
    return cls(config, params, vocab, int(max_length), spec, mesh)

  @classmethod
  def random(cls, size: str = "tiny", *, seed: int = 0,
             vocab_path: str = "default",
             max_length: int = DEFAULT_MAX_LENGTH, dtype: str = "float32",
             mesh: Optional[Mesh] = None, random_init: str = "t5",
             **overrides) -> "TextEncoder":
    """A random-weight T5 (tests, the embedded default). Same seed, same weights.

    Args:
      size: T5 size name.
      seed: init seed.
      vocab_path: SentencePiece model ("default": the demo vocabulary).
      max_length: tokens per caption incl. EOS.
      dtype: compute dtype.
      mesh: device mesh for the params.
      random_init: "t5" or "local" (see ``RANDOM_INITS``).
      **overrides: T5Config fields.

    Returns:
      The encoder.
    """
    check_random_init(random_init)
    vocab_size = vocab_lib.load_vocabulary(vocab_path).vocab_size
    overrides.setdefault("vocab_size", max(
        t5_lib.T5_SIZES[size].vocab_size if size in t5_lib.T5_SIZES else 0,
        _round_up(vocab_size, 128)))
    config = t5_lib.t5_config(size, dtype=dtype, **overrides)
    spec = dict(t5=size, source="random", checkpoint="", seed=int(seed),
                random_init=random_init)
    return cls._build(config, None, vocab_path, max_length, spec, mesh)

  @classmethod
  def from_hf(cls, path: str, *, vocab_path: Optional[str] = None,
              max_length: int = DEFAULT_MAX_LENGTH, dtype: str = "float32",
              mesh: Optional[Mesh] = None) -> "TextEncoder":
    """Loads a Hugging Face T5 checkpoint directory (its spiece.model by default)."""
    config, params = t5_checkpoints.load_hf(path, dtype)
    vocab_path = vocab_path or fileio.join(path, "spiece.model")
    spec = dict(t5=_size_name(config), source="hf",
                checkpoint=fileio.abspath(path), seed=0)
    return cls._build(config, params, vocab_path, max_length, spec, mesh)

  @classmethod
  def from_t5x(cls, checkpoint_dir: str, size: str, vocab_path: str, *,
               max_length: int = DEFAULT_MAX_LENGTH, dtype: str = "float32",
               mesh: Optional[Mesh] = None) -> "TextEncoder":
    """Loads the encoder of a t5x checkpoint of a named T5 size."""
    config = t5_lib.t5_config(size, dtype=dtype)
    params = t5_checkpoints.load_t5x(checkpoint_dir)
    spec = dict(t5=size, source="t5x",
                checkpoint=fileio.abspath(checkpoint_dir), seed=0)
    return cls._build(config, params, vocab_path, max_length, spec, mesh)

  @classmethod
  def from_spec(cls, spec: dict, *, mesh: Optional[Mesh] = None,
                dtype: Optional[str] = None) -> "TextEncoder":
    """Rebuilds the encoder a spec describes and checks it is the same one."""
    dtype = dtype or spec.get("config", {}).get("dtype", "float32")
    source = spec.get("source")
    if source == "random":
      overrides = {k: v for k, v in spec.get("config", {}).items()
                   if k != "dtype"}
      enc = cls.random(spec["t5"], seed=spec["seed"], vocab_path=spec["vocab"],
                       max_length=spec["max_length"], dtype=dtype, mesh=mesh,
                       random_init=spec.get("random_init", "t5"), **overrides)
    elif source == "hf":
      enc = cls.from_hf(spec["checkpoint"], vocab_path=spec["vocab"],
                        max_length=spec["max_length"], dtype=dtype, mesh=mesh)
    elif source == "t5x":
      enc = cls.from_t5x(spec["checkpoint"], spec["t5"], spec["vocab"],
                         max_length=spec["max_length"], dtype=dtype, mesh=mesh)
    else:
      raise ValueError(f"Text encoder spec has unknown source {source!r}; "
                       "expected random, hf or t5x.")
    enc = enc.with_conditioning(spec.get("conditioning", "masked"))
    check_same_encoder(spec, enc.spec, "the rebuilt encoder")
    return enc

  def with_conditioning(self, conditioning: str) -> "TextEncoder":
    """This encoder, encoding for stages that read text as ``conditioning``.

    Args:
      conditioning: one of ``CONDITIONINGS``.

    Returns:
      A ``TextEncoder`` sharing this one's params, whose spec records it.
    """
    if conditioning not in CONDITIONINGS:
      raise ValueError(f"Text conditioning {conditioning!r}; use one of "
                       f"{', '.join(CONDITIONINGS)}.")
    spec = {k: v for k, v in self.spec.items() if k != "conditioning"}
    if conditioning != "masked":  # specs without the key read as "masked"
      spec["conditioning"] = conditioning
    return dataclasses.replace(self, spec=spec)

  @property
  def conditioning(self) -> str:
    """How captions become conditioning (``CONDITIONINGS``)."""
    return self.spec.get("conditioning", "masked")

  # --- encoding -----------------------------------------------------------------

  @property
  def d_model(self) -> int:
    return self.config.d_model

  def _forward(self):
    fn = getattr(self, "_jit_forward", None)
    if fn is None:
      module = t5_lib.T5Encoder(self.config)
      batch = parallel.batch_sharding(self.mesh, 2)
      fn = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask),
                   in_shardings=(None, batch, batch),
                   out_shardings=parallel.batch_sharding(self.mesh, 3))
      self._jit_forward = fn  # pylint: disable=attribute-defined-outside-init
    return fn

  def encode_tokens(self, ids: np.ndarray, mask: np.ndarray
                    ) -> tuple[jax.Array, jax.Array]:
    """Runs the encoder on token ids.

    Args:
      ids: ``[B, L]`` int32 token ids (0 = padding).
      mask: ``[B, L]`` bool, True for real tokens.

    Returns:
      (embeddings ``[B, L, D]`` float32, mask ``[B, L]`` bool). Under
      "masked" conditioning, positions past the tokens are zeros and masked
      (a row with no token, the null text, is all zeros, all masked); under
      "full" every position keeps T5's output and the mask is all True.
    """
    ids = np.asarray(ids, np.int32)
    mask = np.asarray(mask, bool)
    n = ids.shape[0]
    shards = parallel.data_parallel_size(self.mesh)
    pad = (-n) % shards  # the batch must split evenly over the data axes
    if pad:
      ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
      mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], bool)])
    # Explicit transfers: the mesh is this process's devices, and jit refuses
    # sharded numpy inputs in multi-process runs.
    sharding = parallel.batch_sharding(self.mesh, 2)
    emb = self._forward()(self.params, jax.device_put(ids, sharding),
                          jax.device_put(mask, sharding))[:n]
    mask = jnp.asarray(mask[:n])
    if self.conditioning == "full":
      return emb, jnp.ones_like(mask)
    return jnp.where(mask[..., None], emb, 0.0), mask

  def encode(self, texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Encodes captions to (embeddings ``[B, max_length, D]``, mask ``[B, max_length]``).

    Captions longer than ``max_length`` tokens are truncated (EOS kept) with
    a warning; "" is the null text (all-False mask, zero embeddings) under
    "masked" conditioning, T5 of the empty caption under "full" (which also
    lowercases and strips captions, as IF's pipeline does).
    """
    texts = list(texts)
    full = self.conditioning == "full"
    if full:
      texts = [(t.decode("utf-8", errors="replace") if isinstance(t, bytes)
                else t).lower().strip() for t in texts]
    ids, mask, truncated = tokenize(self.vocab, texts, self.max_length,
                                    empty_is_null=not full)
    if truncated:
      logging.warning("%d of %d prompts were longer than %d tokens and were "
                      "truncated.", truncated, len(texts), self.max_length)
    return self.encode_tokens(ids, mask)


def check_random_init(random_init: str) -> None:
  """Raises a one-line ValueError for an unknown ``random_init``."""
  if random_init not in RANDOM_INITS:
    raise ValueError(f"Unknown text.random_init {random_init!r}; choose one of "
                     f"{', '.join(RANDOM_INITS)}.")


# Relative-position logit of every bucket but a head's own under "local":
# e^-10 leaves the chosen neighbour ~all the attention weight.
_LOCAL_BIAS_OFF = -10.0


def local_offsets(num_heads: int) -> list[int]:
  """The relative offset each head attends to under "local": -1, +1, -2, +2, ..."""
  return [(h // 2 + 1) * (1 if h % 2 else -1) for h in range(num_heads)]


def local_position_bias(config: t5_lib.T5Config) -> np.ndarray:
  """``[heads, num_buckets]`` relative-position logits of the "local" init.

  Head h gives logit 0 to the bucket of its offset and ``_LOCAL_BIAS_OFF`` to
  every other bucket. Where its neighbour does not exist (the caption's first
  or last tokens) the head spreads over the remaining ones, which marks the
  caption's ends.
  """
  n = 4 * config.num_buckets  # long enough for every offset's bucket
  buckets = t5_lib.relative_position_buckets(n, n, config.num_buckets,
                                             config.max_distance)
  table = np.full((config.num_heads, config.num_buckets), _LOCAL_BIAS_OFF,
                  np.float32)
  for h, offset in enumerate(local_offsets(config.num_heads)):
    table[h, buckets[n // 2, n // 2 + offset]] = 0.0
  return table


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _size_name(config: t5_lib.T5Config) -> str:
  for name, ref in t5_lib.T5_SIZES.items():
    if (ref.d_model, ref.num_layers, ref.d_ff) == (config.d_model,
                                                   config.num_layers, config.d_ff):
      return name
  return f"custom-{config.d_model}x{config.num_layers}"


def _abstract_boxed(module: t5_lib.T5Encoder):
  return jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
      jnp.ones((1, 8), bool)))


def _check_param_shapes(got, want, where: str) -> None:
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  missing = sorted(jax.tree_util.keystr(k) for k in set(flat_want) - set(flat_got))
  if missing:
    raise ValueError(f"T5 checkpoint {where!r} lacks {len(missing)} encoder "
                     f"parameters (first: {missing[0]}); is it the right size?")
  for k, w in flat_want.items():
    if tuple(np.shape(flat_got[k])) != tuple(w.shape):
      raise ValueError(f"T5 checkpoint {where!r}: {jax.tree_util.keystr(k)} "
                       f"has shape {tuple(np.shape(flat_got[k]))}, expected "
                       f"{tuple(w.shape)}; is it the right T5 size?")


def check_same_encoder(expected: dict, got: dict, what: str) -> None:
  """Raises one clear line if two specs describe different text encoders."""
  def identity(spec, key):
    # Specs written before random_init existed describe T5's own init.
    if key == "random_init" and spec.get("source") == "random":
      return spec.get(key, "t5")
    if key == "conditioning":
      return spec.get(key, "masked")
    return spec.get(key)

  for key in SPEC_IDENTITY_KEYS + ("config",):
    e, g = identity(expected, key), identity(got, key)
    if key == "config" and e and g:
      e = {k: v for k, v in e.items() if k != "dtype"}
      g = {k: v for k, v in g.items() if k != "dtype"}
    if e != g:
      raise ValueError(
          f"Text encoder mismatch: {what} has {key}={g!r} but the embeddings "
          f"were made with {key}={e!r}; use the same T5 checkpoint, "
          "vocabulary and max length.")


def from_config(text, mesh: Optional[Mesh] = None) -> TextEncoder:
  """Builds the encoder a ``config.text`` section describes.

  Args:
    text: ConfigDict with t5, source, checkpoint, vocab, max_length, seed,
      dtype (see ``config_defaults.text_defaults``).
    mesh: device mesh for the params (default: this process's devices).

  Returns:
    A ``TextEncoder``.
  """
  source = text.source
  if source == "random":
    return TextEncoder.random(text.t5, seed=int(text.seed),
                              vocab_path=text.vocab or "default",
                              max_length=int(text.max_length),
                              dtype=text.dtype, mesh=mesh,
                              random_init=str(text.get("random_init", "t5")))
  if not text.checkpoint:
    raise ValueError(f"config.text.checkpoint is empty but text.source is "
                     f"{source!r}; set it to the T5 checkpoint directory, or use "
                     "--config.text.source=random.")
  if source == "hf":
    return TextEncoder.from_hf(text.checkpoint, vocab_path=text.vocab or None,
                               max_length=int(text.max_length), dtype=text.dtype,
                               mesh=mesh)
  if source == "t5x":
    if not text.vocab:
      raise ValueError("config.text.vocab is empty; set it to T5's "
                       "sentencepiece .model file (cc_all.32000).")
    return TextEncoder.from_t5x(text.checkpoint, text.t5, text.vocab,
                                max_length=int(text.max_length),
                                dtype=text.dtype, mesh=mesh)
  raise ValueError(f"Unknown config.text.source {source!r}; choose t5x, hf or "
                   "random.")
