"""deepfloyd_if's own checkpoint layout, the file readers, streaming writes.

deepfloyd_if (the deep-floyd/IF repository) ships a stage as ``config.yml``
(its U-Net's keyword arguments under ``params``) and ``pytorch_model.bin``
(a torch.save'd state dict in its module names). A tiny random diffusers IF
U-Net is written in that layout here; ``imagen-convert`` must turn it into
exactly the parameters the diffusers layout of the same weights gives, and
reproduce diffusers' output. Torch is a test dependency only: the converter
reads the zip with ``tensor_files``.
"""

import collections
import gc
import json
import os
import shutil
import weakref

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
import yaml

from imagen_jax import cascade as cascade_lib
from imagen_jax import convert
from imagen_jax import convert_if
from imagen_jax import parallel
from imagen_jax import tensor_files
from imagen_jax.diffusion import discrete
from imagen_jax.text import vocab as vocab_lib
from tests.test_if import tiny_if_config
from tests.test_if_convert import T5_KW

HEAD_DIM = 8
# deepfloyd's ResBlock / AttentionBlock module names and diffusers' ones.
RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"),
       ("emb_layers.1", "time_emb_proj"), ("out_layers.0", "norm2"),
       ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
TOP = (("time_embed.0", "time_embedding.linear_1"),
       ("time_embed.2", "time_embedding.linear_2"),
       ("aug_proj.0", "class_embedding.linear_1"),
       ("aug_proj.2", "class_embedding.linear_2"),
       ("encoder_proj", "encoder_hid_proj"),
       ("encoder_pooling.0", "add_embedding.norm1"),
       ("encoder_pooling.1.q_proj", "add_embedding.pool.q_proj"),
       ("encoder_pooling.1.k_proj", "add_embedding.pool.k_proj"),
       ("encoder_pooling.1.v_proj", "add_embedding.pool.v_proj"),
       ("encoder_pooling.2", "add_embedding.proj"),
       ("encoder_pooling.3", "add_embedding.norm2"),
       ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"),
       ("out.2", "conv_out"))


def diffusers_config(sr: bool) -> dict:
  """The diffusers config of the network each config.yml below describes."""
  cfg = dict(tiny_if_config(sr), norm_num_groups=32, encoder_hid_dim=32,
             cross_attention_dim=64, time_embedding_dim=64)
  if sr:
    cfg.update(only_cross_attention=[False, True],
               mid_block_only_cross_attention=True)
  return cfg


def deepfloyd_params(sr: bool) -> dict:
  """config.yml's params, as deepfloyd_if's UNetModel takes them."""
  params = dict(
      in_channels=6 if sr else 3, model_channels=32, out_channels=6,
      num_res_blocks=[1, 2] if sr else 1, attention_resolutions="8",
      channel_mult="1,2", activation="gelu", encoder_dim=32,
      encoder_channels=64, att_pool_heads=2, image_size=16,
      num_head_channels=HEAD_DIM, num_heads=1, use_scale_shift_norm=True,
      resblock_updown=True, conv_resample=True, dropout=0.0, precision="32")
  if sr:
    params.update(disable_self_attentions="8", efficient_activation=True,
                  scale_skip_connection=True, interpolate_mode="bilinear")
  return params


def deepfloyd_state(sd: dict, blocks: list[int], attn: list[bool]) -> dict:
  """A diffusers IF state dict in deepfloyd_if's names and packing.

  The block numbering follows deepfloyd's UNetModel constructor: one
  input_blocks sequence (conv in; per level its res blocks with their
  attention, then a resampling res block), the middle block, and one
  output_blocks sequence walking the levels back up.
  """
  out, used = collections.OrderedDict(), set()

  def copy(dst, src, conv1d=False):
    for p in ("weight", "bias"):
      if f"{src}.{p}" in sd:
        used.add(f"{src}.{p}")
        v = sd[f"{src}.{p}"]
        out[f"{dst}.{p}"] = v[..., None] if conv1d and p == "weight" else v

  def pack(srcs, p):
    # QKVAttention views the projection as [heads, parts * head_dim, T] and
    # splits each head's rows into its parts: rows go head by head.
    parts = [sd[f"{s}.{p}"] for s in srcs]
    used.update(f"{s}.{p}" for s in srcs)
    heads, rest = parts[0].shape[0] // HEAD_DIM, parts[0].shape[1:]
    return torch.stack([x.reshape(heads, HEAD_DIM, *rest) for x in parts],
                       1).reshape(-1, *rest).clone()

  def res(dst, src):
    for a, b in RES:
      copy(f"{dst}.{a}", f"{src}.{b}")

  def att(dst, src):
    copy(f"{dst}.norm", f"{src}.group_norm")
    copy(f"{dst}.norm_encoder", f"{src}.norm_cross")
    copy(f"{dst}.proj_out", f"{src}.to_out.0", conv1d=True)
    qkv = [f"{src}.to_{n}" for n in "qkv" if f"{src}.to_{n}.weight" in sd]
    for name, srcs in (("qkv", qkv),
                       ("encoder_kv", [f"{src}.add_k_proj",
                                       f"{src}.add_v_proj"])):
      out[f"{dst}.{name}.weight"] = pack(srcs, "weight")[..., None]
      out[f"{dst}.{name}.bias"] = pack(srcs, "bias")

  for a, b in TOP:
    copy(a, b)
  out["encoder_pooling.1.positional_embedding"] = sd[
      "add_embedding.pool.positional_embedding"]
  used.add("add_embedding.pool.positional_embedding")
  levels, n = len(blocks), 1
  for level in range(levels):
    for j in range(blocks[level]):
      res(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}")
      if attn[level]:
        att(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}")
      n += 1
    if level < levels - 1:
      res(f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0")
      n += 1
  res("middle_block.0", "mid_block.resnets.0")
  att("middle_block.1", "mid_block.attentions.0")
  res("middle_block.2", "mid_block.resnets.1")
  n = 0
  for level in reversed(range(levels)):
    up = levels - 1 - level
    for j in range(blocks[level] + 1):
      res(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}")
      k = 1
      if attn[level]:
        att(f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}")
        k = 2
      if level and j == blocks[level]:
        res(f"output_blocks.{n}.{k}", f"up_blocks.{up}.upsamplers.0")
      n += 1
  assert used == set(sd), sorted(set(sd) - used)[:5]
  return out


def write_deepfloyd_dir(path: str, sr: bool, seed: int = 0):
  """A tiny random IF stage in deepfloyd_if's layout; returns diffusers'."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**diffusers_config(sr)).eval()
  blocks = [1, 2] if sr else [1, 1]
  state = deepfloyd_state(model.state_dict(), blocks, [False, True])
  os.makedirs(path)
  torch.save(state, os.path.join(path, "pytorch_model.bin"))
  with open(os.path.join(path, "config.yml"), "w") as f:
    yaml.safe_dump({"params": deepfloyd_params(sr)}, f)
  return model


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  """A tiny Hugging Face T5 with IF's directory names (what --text_encoder
  points at: an IF diffusers directory's text_encoder/)."""
  root = tmp_path_factory.mktemp("t5")
  t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_KW)).eval()
  t5.save_pretrained(str(root / "text_encoder"))
  (root / "tokenizer").mkdir()
  shutil.copy(vocab_lib.default_vocab_path(),
              str(root / "tokenizer" / "spiece.model"))
  return str(root / "text_encoder")


def test_torch_zip_reader_resolves_views_and_refuses_other_globals(tmp_path):
  base = torch.randn(6, 8)
  state = collections.OrderedDict(
      half=torch.randn(3, 4, dtype=torch.float16),
      param=torch.nn.Parameter(torch.randn(5)),
      rows=base[2:], transposed=base.t(), column=base[:, 3],
      bf16=torch.randn(2, 3).bfloat16(), scalar=torch.tensor(3.0))
  path = str(tmp_path / "state.bin")
  torch.save(state, path)
  refs = tensor_files.read_torch_zip(path)
  assert list(refs) == list(state)
  for key, value in state.items():
    got = refs[key].read()
    want = value.detach().float().numpy()
    assert got.shape == want.shape, key
    np.testing.assert_array_equal(got.astype(np.float32), want, err_msg=key)
  assert refs["half"].dtype == np.float16
  assert refs["transposed"].strides == (1, 8)

  class Payload:
    def __reduce__(self):
      return (os.system, ("true",))
  torch.save({"x": Payload()}, path)
  with pytest.raises(tensor_files.TensorFileError, match="system"):
    tensor_files.read_torch_zip(path)
  with open(path, "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(tensor_files.TensorFileError, match="not a torch zip"):
    tensor_files.read_torch_zip(path)


def test_safetensors_reader_reads_each_tensor_and_checks_ranges(tmp_path):
  from safetensors.torch import save_file
  state = {"a": torch.randn(4, 3), "b": torch.randn(7).bfloat16(),
           "c": torch.randn(2, 2).half()}
  path = str(tmp_path / "x.safetensors")
  save_file(state, path)
  refs = tensor_files.read_safetensors(path)
  for key, value in state.items():
    np.testing.assert_array_equal(refs[key].read().astype(np.float32),
                                  value.float().numpy())
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 4)
  with pytest.raises(tensor_files.TensorFileError, match="byte range"):
    tensor_files.read_safetensors(path)


def test_deepfloyd_part_follows_its_attention_head_order():
  """Unpacking must give the q/k/v that deepfloyd's QKVAttention computes.

  Its forward pass: qkv = conv(x) viewed as [heads, 3 * ch, T] and split in
  three along the channels; the text's encoder_kv likewise in two.
  """
  rng = np.random.default_rng(0)
  heads, width, length = 3, 3 * HEAD_DIM, 5
  packed = rng.standard_normal((3 * width, width, 1)).astype(np.float32)
  x = rng.standard_normal((width, length)).astype(np.float32)
  qkv = (packed[..., 0] @ x).reshape(heads, 3 * HEAD_DIM, length)
  q, k, v = np.split(qkv, 3, axis=1)
  for part, want in enumerate((q, k, v)):
    w = convert_if.deepfloyd_part(packed, part, 3, HEAD_DIM)
    np.testing.assert_allclose((w @ x).reshape(heads, HEAD_DIM, length),
                               want, rtol=1e-5, atol=1e-5)
  assert convert_if.deepfloyd_part_shape(packed.shape, 0, 3, HEAD_DIM,
                                         "qkv") == (width, width)


@pytest.mark.parametrize("resolutions,disable,cross_only", [
    ("8", "8", [False, True]),
    ([2], [2], [False, True]),
    ([2], True, [False, True]),
    # deepfloyd_if compares the levels' rates with the raw argument: a
    # string's characters, so nothing is disabled.
    ("8", True, [False, False]),
    ("8", False, [False, False]),
])
def test_deepfloyd_disabled_self_attention_levels(resolutions, disable,
                                                  cross_only):
  params = dict(deepfloyd_params(False), attention_resolutions=resolutions,
                disable_self_attentions=disable)
  cfg = convert_if.deepfloyd_config_to_diffusers(params, stage_ii=False)
  assert cfg["down_block_types"] == ["ResnetDownsampleBlock2D",
                                     "SimpleCrossAttnDownBlock2D"]
  assert cfg["only_cross_attention"] == cross_only
  assert cfg["mid_block_only_cross_attention"] == cross_only[-1]


def test_streaming_save_holds_one_window_and_reads_back(tmp_path):
  """save_streaming loads a window of tensors at a time, never the tree."""
  rng = np.random.default_rng(0)
  values = {f"w{i}": rng.standard_normal((64, 32 + i)).astype(np.float32)
            for i in range(12)}
  alive, peak = [0], [0]

  def load(name):
    value = values[name].copy()
    alive[0] += value.nbytes
    peak[0] = max(peak[0], alive[0])
    nbytes = value.nbytes
    weakref.finalize(value, lambda: alive.__setitem__(0, alive[0] - nbytes))
    return value

  tree = {"block": {name: convert.LazyParam(v.shape, lambda n=name: load(n),
                                            name)
                    for name, v in values.items()}}
  total = sum(v.nbytes for v in values.values())
  window = 3 * values["w11"].nbytes
  path = str(tmp_path / "params")
  convert.save_streaming(path, tree, window_bytes=window)
  gc.collect()
  assert 0 < peak[0] <= window + max(v.nbytes for v in values.values())
  assert peak[0] < total / 2
  restored = ocp.StandardCheckpointer().restore(path)
  for name, value in values.items():
    np.testing.assert_array_equal(np.asarray(restored["block"][name]), value)


def _outputs(net, params, model, sr):
  """Ours and diffusers' output on padded captions, and ours unmasked."""
  rng = np.random.default_rng(1)
  # Stage II attends to the text alone (IF-II's layout). diffusers pads a
  # text mask by the image token count, which only fits a text-only
  # attention when the text is as long as the image tokens are many (8 x 8
  # at the attention level here); stage I's [text, image] attention takes
  # any length.
  b, length, res = 2, 64 if sr else 7, 16
  x = rng.standard_normal((b, res, res, 3)).astype(np.float32)
  text = rng.standard_normal((b, length, 32)).astype(np.float32)
  mask = np.ones((b, length), bool)
  mask[0, 4:] = False
  mask[1, length - 2:] = False
  # Garbage, not T5's padding output, where the mask is off: attending to it
  # moves the output far past the tolerance.
  text[~mask] = 10 * rng.standard_normal((int((~mask).sum()), 32)) + 5
  steps = np.array([999, 37])
  kw, extra = {}, {}
  sample = torch.from_numpy(x).permute(0, 3, 1, 2)
  if sr:
    low = rng.standard_normal((b, res, res, 3)).astype(np.float32)
    aug = np.array([250, 0])
    kw = dict(lowres=jnp.asarray(low),
              aug_logsnr=jnp.asarray(discrete.step_logsnrs()[aug]))
    extra = dict(class_labels=torch.from_numpy(aug))
    sample = torch.cat([sample, torch.from_numpy(low).permute(0, 3, 1, 2)], 1)

  def ours(m):
    return np.asarray(net.apply(
        {"params": params}, jnp.asarray(x),
        jnp.asarray(discrete.step_logsnrs()[steps]), jnp.asarray(text),
        jnp.asarray(m), **kw))

  with torch.no_grad():
    ref = model(sample, torch.from_numpy(steps),
                encoder_hidden_states=torch.from_numpy(text),
                encoder_attention_mask=torch.from_numpy(mask),
                **extra).sample.permute(0, 2, 3, 1).numpy()
  return ours(mask), ref, ours(np.ones_like(mask))


@pytest.mark.parametrize("sr", [False, True], ids=["stage_I", "stage_II"])
def test_deepfloyd_layout_converts_like_diffusers(sr, t5_dir, tmp_path):
  src, out = str(tmp_path / "IF-orig"), str(tmp_path / "export")
  model = write_deepfloyd_dir(src, sr)
  assert convert.main(["--src", src, "--out", out,
                       "--text_encoder", t5_dir]) == 0
  loaded = cascade_lib.load_stage(
      out, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  # Exactly the parameters the diffusers layout of the same weights gives.
  want = convert_if.convert_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()}, 2)
  got = jax.tree_util.tree_map(np.asarray, loaded.params)
  assert (jax.tree_util.tree_structure(got)
          == jax.tree_util.tree_structure(want))
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  # And diffusers' output, from the config.yml mapping.
  ours, ref, unmasked = _outputs(loaded.stage.unet.clone(dtype="float32"),
                                 loaded.params, model, sr)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The mask is live: attending to the garbage changes the output.
  assert float(np.abs(unmasked - ours).max()) > 1e-2
  stage = json.load(open(os.path.join(out, "stage.json")))
  assert stage["converted_from"]["layout"] == "deepfloyd_if"
  assert stage["model"]["lowres_cond"] == sr
  spec = json.load(open(os.path.join(out, "text_encoder.json")))
  assert spec["checkpoint"] == t5_dir


def _fails(capsys, *args):
  with pytest.raises(SystemExit) as e:
    convert.main(list(args))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  return err


def test_deepfloyd_bad_inputs_are_one_line_exit_2(t5_dir, tmp_path, capsys):
  src, out = str(tmp_path / "IF-orig"), str(tmp_path / "export")
  write_deepfloyd_dir(src, sr=False)
  assert "pass --text_encoder" in _fails(capsys, "--src", src, "--out", out)
  assert "drop --variant" in _fails(capsys, "--src", src, "--out", out,
                                    "--text_encoder", t5_dir, "--variant",
                                    "fp16")
  # A tensor deepfloyd's U-Net does not have.
  bin_path = os.path.join(src, "pytorch_model.bin")
  state = torch.load(bin_path)
  torch.save(dict(state, **{"input_blocks.1.0.extra.weight": torch.ones(2)}),
             bin_path)
  err = _fails(capsys, "--src", src, "--out", out, "--text_encoder", t5_dir)
  assert "pytorch_model.bin" in err and "input_blocks.1.0.extra.weight" in err
  # A tensor missing.
  del state["out.2.bias"]
  torch.save(state, bin_path)
  assert "conv_out/bias" in _fails(capsys, "--src", src, "--out", out,
                                   "--text_encoder", t5_dir)
  # config.yml keys and values we do not map.
  cfg_path = os.path.join(src, "config.yml")
  for change, named in ((dict(activation="gelu_jit"), "activation='gelu_jit'"),
                        (dict(new_option=1), "'new_option'"),
                        (dict(num_head_channels=-1), "num_head_channels")):
    with open(cfg_path, "w") as f:
      yaml.safe_dump({"params": dict(deepfloyd_params(False), **change)}, f)
    err = _fails(capsys, "--src", src, "--out", out, "--text_encoder", t5_dir)
    assert "config.yml" in err and named in err
  os.remove(bin_path)
  assert "pytorch_model.bin is missing" in _fails(
      capsys, "--src", src, "--out", out, "--text_encoder", t5_dir)
  assert not os.path.exists(os.path.join(out, "params"))
