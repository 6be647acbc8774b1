"""imagen-convert on a tiny IF directory in diffusers' layout.

The directory is what diffusers and transformers write for IF (``unet/`` as
fp16 safetensors shards with their index, ``text_encoder/`` as a Hugging Face
T5, ``tokenizer/spiece.model``), built from random tiny models. The export
must load through ``Cascade`` on the 8-device mesh with FSDP, reproduce the
diffusers U-Net, sample from text, and fine-tune with ``init_from``.
"""

import dataclasses
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from imagen_jax import cascade as cascade_lib
from imagen_jax import config_defaults
from imagen_jax import convert
from imagen_jax import parallel
from imagen_jax.diffusion import discrete
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import vocab as vocab_lib
from imagen_jax.train import loop
from tests import helpers
from tests.test_if import if_scheduler, tiny_if_config

T5_KW = dict(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_layers=2,
             num_heads=4, relative_attention_num_buckets=32,
             relative_attention_max_distance=20,
             feed_forward_proj="gated-gelu", dropout_rate=0.0,
             layer_norm_epsilon=1e-6)


def _write_if_dir(path, sr=False):
  torch.manual_seed(0)
  cfg = dict(tiny_if_config(sr), encoder_hid_dim=32)
  unet = diffusers.UNet2DConditionModel(**cfg).eval()
  # What the model card's fp16 variant holds: the weights rounded to fp16.
  unet = unet.to(torch.float16)
  unet.save_pretrained(os.path.join(path, "unet"), variant="fp16",
                       safe_serialization=True, max_shard_size="100KB")
  t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_KW)).eval()
  t5.save_pretrained(os.path.join(path, "text_encoder"))
  os.makedirs(os.path.join(path, "tokenizer"))
  shutil.copy(vocab_lib.default_vocab_path(),
              os.path.join(path, "tokenizer", "spiece.model"))
  with open(os.path.join(path, "model_index.json"), "w") as f:
    # As the model cards have it.
    json.dump({"_class_name": "IFSuperResolutionPipeline" if sr
               else "IFPipeline"}, f)
  return unet.to(torch.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("if")
  src, out = str(root / "IF-I-tiny"), str(root / "export")
  model = _write_if_dir(src)
  assert convert.main(["--src", src, "--out", out, "--variant", "fp16"]) == 0
  return src, out, model


def test_fp16_shards_convert_and_match_diffusers_on_fsdp_mesh(converted):
  src, out, model = converted
  unet_files = os.listdir(os.path.join(src, "unet"))
  assert "diffusion_pytorch_model.safetensors.index.fp16.json" in unet_files
  mesh = parallel.make_mesh((1, 8, 1), jax.devices()[:8])
  loaded = cascade_lib.load_stage(out, mesh)
  kernel = loaded.params["down_1_attn_0"]["query"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert len(kernel.sharding.device_set) == 8
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  text = rng.standard_normal((2, 5, 32)).astype(np.float32)
  steps = np.array([500, 3])
  ours = loaded.stage.unet.clone(dtype="float32").apply(
      {"params": loaded.params}, jnp.asarray(x),
      jnp.asarray(discrete.step_logsnrs()[steps]), jnp.asarray(text),
      jnp.ones((2, 5), bool))
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2),
                torch.from_numpy(steps),
                encoder_hidden_states=torch.from_numpy(text)).sample
  np.testing.assert_allclose(np.asarray(ours),
                             ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  # The record sends sampling to IF's schedule, steps and T5.
  stage = json.load(open(os.path.join(out, "stage.json")))
  assert stage["diffusion"]["schedule"] == "discrete_cosine"
  assert stage["sample"]["timesteps"] == "smart100"
  spec = json.load(open(os.path.join(out, "text_encoder.json")))
  assert spec["checkpoint"] == os.path.join(src, "text_encoder")
  assert spec["max_length"] == 77


def test_default_float32_single_file_converts_to_the_same_params(
    converted, tmp_path):
  """diffusers' default weights (one float32 file, no variant) convert to
  the parameters the fp16 shards give (the model holds fp16-rounded values)."""
  src, out, model = converted
  single = str(tmp_path / "IF-I-tiny-fp32")
  shutil.copytree(src, single, ignore=shutil.ignore_patterns("unet"))
  model.save_pretrained(os.path.join(single, "unet"), safe_serialization=True)
  assert "diffusion_pytorch_model.safetensors" in os.listdir(
      os.path.join(single, "unet"))
  out32 = str(tmp_path / "export32")
  assert convert.main(["--src", single, "--out", out32]) == 0
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  want = cascade_lib.load_stage(out, mesh).params
  got = cascade_lib.load_stage(out32, mesh).params
  assert (jax.tree_util.tree_structure(got)
          == jax.tree_util.tree_structure(want))
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  record = json.load(open(os.path.join(out32, "stage.json")))
  assert record["converted_from"]["variant"] == "default"
  assert record["converted_from"]["files"] == [
      "diffusion_pytorch_model.safetensors"]


def test_converted_stage_samples_through_cascade_sharded(converted):
  _, out, _ = converted
  casc = cascade_lib.Cascade.load([out], mesh_shape=(1, 8, 1))
  kernel = casc.stages[0].params["down_1_attn_0"]["query"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  settings = cascade_lib.StageSettings.from_config(casc.stages[0].config.sample)
  settings = type(settings)(**dict(vars(settings), timesteps="steps:999,500,0"))
  images = casc.sample(["a red circle"], settings=[settings], num_samples=2)
  assert images[0].shape == (2, 16, 16, 3)
  assert images[0].dtype == np.uint8
  # The same pictures as on one device: sharding changes where, not what.
  # Unguided: the export computes in bfloat16, and guidance 7 at t = 999
  # (x0 = (z - sigma eps) / alpha) magnifies the rounding differences of two
  # differently compiled programs into different pictures.
  plain = type(settings)(**dict(vars(settings), guidance_scale=1.0))
  sharded = casc.sample(["a red circle"], settings=[plain], num_samples=2)[0]
  one = cascade_lib.Cascade.load(
      [out], mesh=parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  single = one.sample(["a red circle"], settings=[plain], num_samples=2)[0]
  diff = np.abs(sharded.astype(int) - single.astype(int))
  assert diff.max() <= 3 and diff.mean() < 0.1, (diff.max(), diff.mean())
  assert sharded.std() > 0


def test_stage_one_and_two_sample_as_one_cascade(converted, tmp_path, capsys):
  """IF-I then IF-II, converted separately: with one T5 directory for both
  (--text_encoder) they form a cascade; with each its own copy they are
  refused with the fix in the message."""
  src, out, _ = converted
  src2 = str(tmp_path / "IF-II-tiny")
  _write_if_dir(src2, sr=True)
  alone = str(tmp_path / "export_2_alone")
  assert convert.main(["--src", src2, "--out", alone, "--variant", "fp16",
                       "--resolution", "32", "--lowres_resolution", "16"]) == 0
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  with pytest.raises(cascade_lib.CascadeError,
                     match="--text_encoder=.*IF-I-tiny/text_encoder"):
    cascade_lib.Cascade.load([out, alone], mesh=mesh)
  shared = str(tmp_path / "export_2")
  assert convert.main([
      "--src", src2, "--out", shared, "--variant", "fp16", "--resolution",
      "32", "--lowres_resolution", "16",
      "--text_encoder", os.path.join(src, "text_encoder")]) == 0
  capsys.readouterr()
  casc = cascade_lib.Cascade.load([out, shared], mesh=mesh)
  assert [s.stage.is_sr for s in casc.stages] == [False, True]
  settings = [cascade_lib.StageSettings.from_config(s.config.sample)
              for s in casc.stages]
  settings = [type(s)(**dict(vars(s), timesteps="steps:999,500,0"))
              for s in settings]
  images = casc.sample(["a red circle"], settings=settings)
  assert [im.shape for im in images] == [(1, 16, 16, 3), (1, 32, 32, 3)]
  assert images[1].std() > 0


def test_cascade_text_path_matches_if_pipeline(converted):
  """Prompts in, images out, as diffusers' IFPipeline does it: its tokenizer
  (lowercased captions, 77 tokens with padding), T5's outputs at every
  position unmasked, and guidance against T5 of the empty caption."""
  src, out, model = converted
  casc = cascade_lib.Cascade.load(
      [out], mesh=parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  assert casc.text_encoder.conditioning == "full"
  # float32 T5 (the record says bfloat16) to compare with transformers'.
  casc = cascade_lib.Cascade(casc.stages, encoder_lib.TextEncoder.from_spec(
      casc.stages[0].text_encoder_spec, mesh=casc.mesh, dtype="float32"),
                             casc.mesh)
  prompts = ["A Red circle ", "two blue squares above a cyan triangle"]
  batch = casc.prepare(prompts)

  tokenizer = transformers.T5Tokenizer.from_pretrained(
      os.path.join(src, "tokenizer"))
  t5 = transformers.T5EncoderModel.from_pretrained(
      os.path.join(src, "text_encoder")).eval()
  # The embeddings: every one of the 77 positions, padding included, and the
  # empty caption's as the unconditional text.
  for texts, got in ((prompts, batch.inputs.text),
                     (["", ""], batch.inputs.negative_text)):
    toks = tokenizer([t.lower().strip() for t in texts], padding="max_length",
                     max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
      want = t5(toks.input_ids, attention_mask=toks.attention_mask)[0].numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
  assert bool(np.asarray(batch.inputs.text_mask).all())
  assert bool(np.asarray(batch.inputs.negative_mask).all())

  # The images, with the pipeline's noise draws.
  steps = [999, 700, 400, 100, 0]
  gen = torch.Generator().manual_seed(0)
  nchw = (2, 3, 16, 16)
  init = torch.randn(nchw, generator=gen)
  draws = torch.stack([torch.randn(nchw, generator=gen) for _ in steps[:-1]]
                      + [torch.zeros(nchw)])
  noise = {"init": jnp.asarray(np.moveaxis(init.numpy(), 1, -1)),
           "steps": jnp.asarray(np.moveaxis(draws.numpy(), 2, -1))}
  pipe = diffusers.IFPipeline(
      unet=model, scheduler=if_scheduler(), tokenizer=tokenizer,
      text_encoder=t5, safety_checker=None, feature_extractor=None,
      watermarker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipe(prompt=prompts, timesteps=steps, guidance_scale=7.0,
               output_type="pt", generator=torch.Generator().manual_seed(0),
               height=16, width=16, clean_caption=False).images
  loaded = casc.stages[0]
  stage = dataclasses.replace(loaded.stage,
                              unet=loaded.stage.unet.clone(dtype="float32"))
  settings = cascade_lib.StageSettings(
      sampler="ancestral", guidance_scale=7.0, threshold="dynamic",
      percentile=95.0, threshold_max=1.5,
      timesteps="steps:" + ",".join(map(str, steps)))
  ours = stage.sample(loaded.params, batch.inputs, jax.random.PRNGKey(0),
                      settings, noise=noise)
  np.testing.assert_allclose(np.asarray(ours),
                             ref.permute(0, 2, 3, 1).numpy(), atol=2e-4,
                             rtol=0)


def test_fine_tune_from_converted_export(converted, tmp_path):
  _, out, _ = converted
  stage = json.load(open(os.path.join(out, "stage.json")))
  overrides = {f"model.{k}": (tuple(v) if isinstance(v, list) else v)
               for k, v in stage["model"].items()}
  overrides.update({
      "model.dtype": "float32", "diffusion.schedule": "discrete_cosine",
      "resolution": 16, "init_from": out, "total_steps": 3,
      "checkpoint_every": 3, "log_every": 1, "optimizer.learning_rate": 1e-3,
      "optimizer.warmup_steps": 1, "optimizer.weight_decay": 0.0,
      "mesh.shape": (1, 8, 1), "sample_every": 0})
  config = helpers.tiny_train_config(**overrides)
  config_defaults.validate(config)
  result = loop.train(config, str(tmp_path / "ft"), progress=False)
  src = cascade_lib.load_stage(out, parallel.make_mesh((1, 1, 1),
                                                        jax.devices()[:1]))
  params = result["state"].params
  # Trained with params sharded over fsdp on the 8-device mesh.
  kernel = params["down_1_attn_0"]["query"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert len(kernel.sharding.device_set) == 8
  # It started from the export and moved: every eps-predicting weight gets a
  # gradient; IF's variance channels get no loss (eps-only training), so
  # Adam leaves their output weights where the export put them.
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree_util.tree_leaves(params),
                             jax.tree_util.tree_leaves(src.params))]
  assert sum(changed) > 0.9 * len(changed)
  out_kernel = np.asarray(params["conv_out"]["kernel"])
  src_kernel = np.asarray(src.params["conv_out"]["kernel"])
  assert out_kernel.shape[-1] == 6
  assert not np.array_equal(out_kernel[..., :3], src_kernel[..., :3])
  np.testing.assert_array_equal(out_kernel[..., 3:], src_kernel[..., 3:])
  losses = helpers.read_scalars(str(tmp_path / "ft"))
  assert sorted(losses) == [1, 2, 3]
  assert all(np.isfinite(v) for v in losses.values())


def _fails(capsys, *args):
  with pytest.raises(SystemExit) as e:
    convert.main(list(args))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  return err


def test_bad_inputs_are_one_line_exit_2(converted, tmp_path, capsys):
  src, _, _ = converted
  out = str(tmp_path / "o")
  assert "no unet/config.json" in _fails(capsys, "--src", str(tmp_path),
                                         "--out", out)
  assert "--variant='bf16' is not supported" in _fails(
      capsys, "--src", src, "--out", out, "--variant", "bf16")
  assert "try --variant=fp16" in _fails(capsys, "--src", src, "--out", out)
  # A missing shard.
  broken = str(tmp_path / "broken")
  shutil.copytree(src, broken)
  shard = sorted(f for f in os.listdir(os.path.join(broken, "unet"))
                 if f.endswith(".safetensors"))[0]
  os.remove(os.path.join(broken, "unet", shard))
  assert shard in _fails(capsys, "--src", broken, "--out", out, "--variant",
                         "fp16")
  # A config key we do not map.
  cfg_path = os.path.join(broken, "unet", "config.json")
  cfg = json.load(open(cfg_path))
  cfg["dual_cross_attention"] = True
  json.dump(cfg, open(cfg_path, "w"))
  assert "dual_cross_attention=True" in _fails(capsys, "--src", broken,
                                               "--out", out, "--variant",
                                               "fp16")
  cfg["dual_cross_attention"] = False
  cfg["brand_new_option"] = 1
  json.dump(cfg, open(cfg_path, "w"))
  assert "'brand_new_option'" in _fails(capsys, "--src", broken, "--out", out,
                                        "--variant", "fp16")
  # Config files that are not what they should be: each named, one line.
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  cfg_path = os.path.join(bad, "unet", "config.json")
  good_cfg = open(cfg_path).read()
  open(cfg_path, "w").write(good_cfg[:-20])
  err = _fails(capsys, "--src", bad, "--out", out, "--variant", "fp16")
  assert err.startswith(f"imagen-convert: {cfg_path} is not valid JSON"), err
  open(cfg_path, "w").write("[1, 2]")
  assert "not an object" in _fails(capsys, "--src", bad, "--out", out,
                                   "--variant", "fp16")
  json.dump(dict(json.loads(good_cfg), norm_num_groups="many"),
            open(cfg_path, "w"))
  err = _fails(capsys, "--src", bad, "--out", out, "--variant", "fp16")
  assert f"{cfg_path}: invalid literal" in err and "'many'" in err, err
  open(cfg_path, "w").write(good_cfg)
  index = os.path.join(bad, "unet",
                       "diffusion_pytorch_model.safetensors.index.fp16.json")
  json.dump({"metadata": {}}, open(index, "w"))
  err = _fails(capsys, "--src", bad, "--out", out, "--variant", "fp16")
  assert index in err and "'weight_map'" in err, err
  shutil.rmtree(os.path.join(bad, "unet"))
  shutil.copytree(os.path.join(src, "unet"), os.path.join(bad, "unet"))
  t5_cfg = os.path.join(bad, "text_encoder", "config.json")
  t5 = json.load(open(t5_cfg))
  json.dump(dict(t5, model_type="bert"), open(t5_cfg, "w"))
  err = _fails(capsys, "--src", bad, "--out", out, "--variant", "fp16")
  assert t5_cfg in err and "'bert'" in err, err
  del t5["d_model"]
  json.dump(t5, open(t5_cfg, "w"))
  err = _fails(capsys, "--src", bad, "--out", out, "--variant", "fp16")
  assert t5_cfg in err and "'d_model'" in err, err
  assert not os.path.exists(out)
  # IF's stage III (the Stable Diffusion x4 upscaler) is a latent model:
  # refused by its pipeline class, its vae/, or its U-Net's 7 -> 4 channels.
  for how in ("index", "vae", "channels"):
    latent = str(tmp_path / f"stage3_{how}")
    shutil.copytree(src, latent)
    if how == "index":
      json.dump({"_class_name": "StableDiffusionUpscalePipeline"},
                open(os.path.join(latent, "model_index.json"), "w"))
    elif how == "vae":
      os.makedirs(os.path.join(latent, "vae"))
    else:
      os.remove(os.path.join(latent, "model_index.json"))
      cfg_path = os.path.join(latent, "unet", "config.json")
      cfg = dict(json.load(open(cfg_path)), in_channels=7, out_channels=4)
      json.dump(cfg, open(cfg_path, "w"))
    err = _fails(capsys, "--src", latent, "--out", out, "--variant", "fp16")
    assert "is not an IF pixel stage" in err and "x4 upscaler" in err, err
  # deepfloyd_if's layout without its weights (tests/test_if_deepfloyd.py
  # converts a whole one).
  orig = tmp_path / "orig"
  orig.mkdir()
  (orig / "config.yml").write_text("params: {}\n")
  assert "pytorch_model.bin is missing" in _fails(capsys, "--src", str(orig),
                                                  "--out", out)
  # Neither layout.
  assert "no unet/config.json" in _fails(capsys, "--src", str(tmp_path),
                                         "--out", out)


def test_notebook_if_section_runs_headless(converted, monkeypatch):
  """The notebook's IF cells (tagged "if"), on the tiny converted stand-in."""
  import nbformat
  from nbclient import NotebookClient
  _, out, _ = converted
  monkeypatch.setenv("IMAGEN_IF_EXPORTS", out)
  monkeypatch.setenv("IMAGEN_IF_TIMESTEPS", "fast27")
  # The sample cell's own scale: the sweep reuses its compiled loop.
  monkeypatch.setenv("IMAGEN_IF_SCALES", "7")
  path = os.path.join(helpers.ROOT, "notebooks", "sample.ipynb")
  nb = nbformat.read(path, as_version=4)
  nb.cells = [c for c in nb.cells if "if" in c.metadata.get("tags", [])]
  assert len(nb.cells) == 4
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": helpers.ROOT}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # the grid and the guidance sweep
