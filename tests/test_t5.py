"""T5 encoder: parity with Hugging Face, the t5x layout, sizes, bad input."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from imagen_jax import parallel
from imagen_jax.models import t5 as t5_lib
from imagen_jax.text import t5_checkpoints
from imagen_jax.text import vocab as vocab_lib
from imagen_jax.text.encoder import TextEncoder, tokenize

HF_KW = dict(vocab_size=1024, d_model=48, d_kv=12, d_ff=96, num_layers=3,
             num_heads=4, relative_attention_num_buckets=32,
             relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
             dropout_rate=0.0, layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(transformers.T5Config(**HF_KW)).eval()
  # Random init leaves T5's tiny relative-bias init; make it matter.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("hf_t5"))
  model.save_pretrained(path)
  shutil.copy(vocab_lib.default_vocab_path(), os.path.join(path, "spiece.model"))
  return path, model


def test_hf_parity_with_padding_and_long_distances(hf_dir):
  path, model = hf_dir
  assert os.path.isfile(os.path.join(path, "model.safetensors"))
  enc = TextEncoder.from_hf(path, max_length=64)
  rng = np.random.RandomState(0)
  length = 50  # > max_distance 20: exercises the log buckets and the cap
  ids = rng.randint(3, 1024, size=(4, length)).astype(np.int32)
  lengths = np.array([50, 37, 9, 1])
  mask = np.arange(length)[None] < lengths[:, None]
  ids = np.where(mask, ids, 0)
  ours, _ = enc.encode_tokens(ids, mask)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).last_hidden_state
  ref = ref.numpy() * mask[..., None]
  diff = float(np.abs(np.asarray(ours) - ref).max())
  assert diff < 1e-4, diff


def test_relative_buckets_match_hf():
  for max_distance in (20, 128):
    for q_len, k_len in ((7, 7), (300, 300)):
      ours = t5_lib.relative_position_buckets(q_len, k_len, 32, max_distance)
      rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
      ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
          rel, bidirectional=True, num_buckets=32, max_distance=max_distance)
      np.testing.assert_array_equal(ours, ref.numpy())


def test_t5x_layout_round_trip(tmp_path):
  enc = TextEncoder.random("tiny", seed=3, max_length=16)
  ckpt = str(tmp_path / "checkpoint_1000")
  t5_checkpoints.save_t5x(jax.device_get(enc.params), ckpt, step=1000)
  # The t5x names, as in the released T5 v1.1 checkpoints.
  for name in ("target.token_embedder.embedding",
               "target.encoder.layers_0.attention.query.kernel",
               "target.encoder.layers_1.mlp.wi_0.kernel",
               "target.encoder.layers_1.mlp.wo.kernel"):
    assert os.path.isdir(os.path.join(ckpt, name)), name
  restored = TextEncoder.from_t5x(ckpt, "tiny", "default", max_length=16)
  for a, b in zip(jax.tree_util.tree_leaves(enc.params),
                  jax.tree_util.tree_leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  texts = ["a red circle to the left of a blue square", ""]
  np.testing.assert_allclose(restored.encode(texts)[0], enc.encode(texts)[0],
                             atol=1e-6)
  assert restored.spec["source"] == "t5x"


def test_param_names_are_t5x_names():
  module = t5_lib.T5Encoder(t5_lib.t5_config("tiny"))
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))))
  import flax
  names = set(flax.traverse_util.flatten_dict(shapes["params"], sep="/"))
  assert "token_embedder/embedding" in names
  assert "encoder/relpos_bias/rel_embedding" in names
  assert "encoder/encoder_norm/scale" in names
  for leaf in ("pre_attention_layer_norm/scale", "attention/query/kernel",
               "attention/key/kernel", "attention/value/kernel",
               "attention/out/kernel", "pre_mlp_layer_norm/scale",
               "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"):
    assert f"encoder/layers_1/{leaf}" in names, leaf


def test_xxl_encoder_size():
  config = t5_lib.t5_config("xxl")
  module = t5_lib.T5Encoder(config)
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))))
  n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert n == t5_lib.count_encoder_params(config)
  # Paper: ~4.6B for the encoder (4.63B without the 32128 x 4096 embedding).
  assert 4.5e9 < n < 4.85e9, n
  assert (config.d_model, config.d_ff, config.num_heads, config.head_dim,
          config.num_layers, config.vocab_size) == (4096, 10240, 64, 64, 24, 32128)


def test_sharded_encoding_matches_single_device():
  texts = ["a small red circle", "two blue squares above a green triangle", "",
           "a handwritten digit four"] * 2
  one = TextEncoder.random("tiny", seed=1, max_length=16,
                           mesh=parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  eight = TextEncoder.random("tiny", seed=1, max_length=16,
                             mesh=parallel.make_mesh((2, 2, 2)))
  e1, m1 = one.encode(texts)
  e8, m8 = eight.encode(texts)
  np.testing.assert_array_equal(m1, m8)
  np.testing.assert_allclose(e8, e1, atol=1e-5)
  # Params really are split over the mesh.
  emb = eight.params["token_embedder"]["embedding"]
  assert len({str(s.index) for s in emb.addressable_shards}) > 1


def test_tokenize_eos_trim_and_null_text():
  vocab = vocab_lib.load_vocabulary("default")
  ids, mask, truncated = tokenize(
      vocab, ["a red circle", "", "word " * 40, b"caf\xe9 bad utf8"], 16)
  assert truncated == 1
  n = int(mask[0].sum())
  assert ids[0, n - 1] == vocab.eos_id and not mask[0, n:].any()
  assert not mask[1].any()                       # null text: nothing at all
  assert mask[2].all() and ids[2, -1] == vocab.eos_id  # trimmed, EOS kept
  assert mask[3].sum() > 1                       # bad bytes replaced, encoded


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vocab_lib.load_vocabulary(str(tmp_path / "missing.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    vocab_lib.load_vocabulary(str(bad))
  empty = tmp_path / "empty_ckpt"
  empty.mkdir()
  with pytest.raises(ValueError, match="neither a t5x checkpoint"):
    t5_checkpoints.load_t5x(str(empty))
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    t5_checkpoints.load_hf(str(empty))
  (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="not T5"):
    t5_checkpoints.load_hf(str(empty))
  with pytest.raises(ValueError, match="Unknown T5 size 'huge'"):
    t5_lib.t5_config("huge")
