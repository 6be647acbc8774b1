"""DeepFloyd IF: network, schedule and sampling parity with diffusers.

diffusers builds IF's ``UNet2DConditionModel`` from small random configs in
IF's shape (those of its own IF pipeline tests); its state dict converts
through ``convert_if`` and our ``UNet(family="if")`` must match its output.
"""

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.deepfloyd_if import timesteps as if_timesteps

from imagen_jax import convert_if
from imagen_jax import stage as stage_lib
from imagen_jax.diffusion import discrete
from imagen_jax.models.unet import UNet


def tiny_if_config(sr: bool) -> dict:
  """diffusers' IF pipeline-test U-Nets (stage I / stage II), smaller text."""
  cfg = dict(
      sample_size=16, layers_per_block=[1, 2] if sr else 1,
      block_out_channels=[32, 64],
      down_block_types=["ResnetDownsampleBlock2D",
                        "SimpleCrossAttnDownBlock2D"],
      mid_block_type="UNetMidBlock2DSimpleCrossAttn",
      up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
      in_channels=6 if sr else 3, out_channels=6, cross_attention_dim=32,
      encoder_hid_dim=24, attention_head_dim=8, addition_embed_type="text",
      addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
      resnet_time_scale_shift="scale_shift", act_fn="gelu",
      norm_num_groups=8)
  if sr:
    # IF-II's extras: aug-level class embedding, activated embedding,
    # residual scaling (as convert_if.py in diffusers sets for stage II).
    cfg.update(class_embed_type="timestep", time_embedding_act_fn="gelu",
               time_embedding_dim=48, resnet_skip_time_act=True,
               resnet_out_scale_factor=1 / 0.7071,
               mid_block_scale_factor=1 / 0.7071)
  return cfg


def diffusers_unet(sr: bool, seed: int = 0):
  torch.manual_seed(seed)
  return diffusers.UNet2DConditionModel(**tiny_if_config(sr)).eval()


def converted(model):
  """Our U-Net and params for a diffusers IF U-Net (in memory)."""
  fields = convert_if.unet_config_to_model(dict(model.config))
  fields.pop("resolution")
  net = UNet(**fields, dtype="float32")
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return net, convert_if.convert_state_dict(state, len(fields["channel_mult"]))


# Every kernel implementation this backend runs (imagen_jax.kernels).
KERNELS = ["reference", "xla_cpu"] + (
    ["cudnn"] if jax.default_backend() == "gpu" else [])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sr", [False, True], ids=["stage1", "stage2"])
def test_unet_matches_diffusers(sr, kernels):
  model = diffusers_unet(sr)
  net, params = converted(model)
  net = net.clone(kernels=kernels)
  b, length, res = 2, 7, 16
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, res, res, 3)).astype(np.float32)
  text = rng.standard_normal((b, length, 24)).astype(np.float32)
  mask = np.ones((b, length), bool)
  mask[0, 4:] = False                       # a padded caption
  # Garbage where the mask is off, so attending to it would show.
  text[0, 4:] = 10 * rng.standard_normal((length - 4, 24)) + 5
  steps = np.array([999, 37])
  kw, extra = {}, {}
  if sr:
    low = rng.standard_normal((b, res, res, 3)).astype(np.float32)
    aug = np.array([250, 0])
    kw = dict(lowres=jnp.asarray(low),
              aug_logsnr=jnp.asarray(discrete.step_logsnrs()[aug]))
    extra = dict(class_labels=torch.from_numpy(aug))

  # Every parameter of ours is filled, with its shape.
  shapes = nn.unbox(jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), jnp.asarray(x), jnp.zeros((b,)),
      jnp.asarray(text), jnp.asarray(mask), **kw))["params"])
  assert (jax.tree_util.tree_structure(shapes)
          == jax.tree_util.tree_structure(params))
  for s, p in zip(jax.tree_util.tree_leaves(shapes),
                  jax.tree_util.tree_leaves(params)):
    assert s.shape == p.shape

  ours = net.apply({"params": params}, jnp.asarray(x),
                   jnp.asarray(discrete.step_logsnrs()[steps]),
                   jnp.asarray(text), jnp.asarray(mask), **kw)
  sample = torch.from_numpy(x).permute(0, 3, 1, 2)
  if sr:
    sample = torch.cat([sample, torch.from_numpy(low).permute(0, 3, 1, 2)], 1)
  with torch.no_grad():
    ref = model(sample, torch.from_numpy(steps),
                encoder_hidden_states=torch.from_numpy(text),
                encoder_attention_mask=torch.from_numpy(mask),
                **extra).sample.permute(0, 2, 3, 1).numpy()
  assert ours.shape == (b, res, res, 6)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
  # The mask is live: unmasking the padding changes the output.
  unmasked = net.apply({"params": params}, jnp.asarray(x),
                       jnp.asarray(discrete.step_logsnrs()[steps]),
                       jnp.asarray(text), jnp.ones((b, length), bool), **kw)
  assert float(jnp.abs(unmasked - ours)[0].max()) > 1e-3


@pytest.mark.parametrize("sr", [False, True], ids=["stage1", "stage2"])
def test_kernel_implementations_give_the_same_loss_and_gradients(sr):
  # IF's blocks go through the kernel interface as Imagen's do: the XLA:CPU
  # rewrites must be the reference function, gradients included.
  net, params = converted(diffusers_unet(sr, seed=2))
  b, length, res = 2, 5, 16
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((b, res, res, 3)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((b, length, 24)), jnp.float32)
  mask = jnp.asarray([[True] * 3 + [False] * 2, [True] * length])
  logsnr = jnp.asarray(discrete.step_logsnrs()[np.array([500, 20])])
  kw = {}
  if sr:
    kw = dict(lowres=jnp.asarray(rng.standard_normal((b, 8, 8, 3)),
                                 jnp.float32),
              aug_logsnr=jnp.asarray(discrete.step_logsnrs()[np.array([100, 0])]))
  probe = jnp.asarray(rng.standard_normal((b, res, res, 6)), jnp.float32)

  def loss(module, p):
    out = module.apply({"params": p}, x, logsnr, text, mask, **kw)
    return jnp.sum(out * probe)

  step = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  want, grads = step(net.clone(kernels="reference"), params)
  for impl in KERNELS[1:]:
    got, grads_i = step(net.clone(kernels=impl), params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Some gradients are zero in exact arithmetic (a key bias: softmax is
    # shift-invariant; text_proj's bias, removed by one-channel groups of the
    # text GroupNorm): compare those at the scale of the whole gradient.
    floor = 1e-6 * max(float(jnp.abs(g).max())
                       for g in jax.tree_util.tree_leaves(grads))
    for (path, g), gi in zip(jax.tree_util.tree_leaves_with_path(grads),
                             jax.tree_util.tree_leaves(grads_i)):
      np.testing.assert_allclose(
          gi, g, rtol=1e-4, atol=max(1e-5 * float(jnp.abs(g).max()), floor),
          err_msg=jax.tree_util.keystr(path))


def test_low_res_input_is_upsampled_with_aligned_corners():
  model = diffusers_unet(True)
  net, params = converted(model)
  rng = np.random.default_rng(2)
  low = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
  up = torch.nn.functional.interpolate(
      torch.from_numpy(low).permute(0, 3, 1, 2), (16, 16), mode="bilinear",
      align_corners=True).permute(0, 2, 3, 1).numpy()
  args = (jnp.asarray(rng.standard_normal((1, 16, 16, 3)), jnp.float32),
          jnp.asarray(discrete.step_logsnrs()[[500]]),
          jnp.asarray(rng.standard_normal((1, 3, 24)), jnp.float32),
          jnp.ones((1, 3), bool))
  aug = jnp.asarray(discrete.step_logsnrs()[[100]])
  a = net.apply({"params": params}, *args, lowres=jnp.asarray(low),
                aug_logsnr=aug)
  b = net.apply({"params": params}, *args, lowres=jnp.asarray(up),
                aug_logsnr=aug)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_discrete_schedule_matches_diffusers_ddpm_cosine():
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                  beta_schedule="squaredcos_cap_v2")
  # diffusers accumulates the product in float32 (1e-5 relative drift by
  # the last step); ours is float64.
  np.testing.assert_allclose(discrete.alphas_cumprod(),
                             sched.alphas_cumprod.double().numpy(), rtol=5e-5)
  schedule = discrete.logsnr_schedule()
  table = discrete.step_logsnrs()
  # t = step / T lands on the table; t = 1 is the last step.
  steps = np.array([0, 1, 250, 999])
  np.testing.assert_array_equal(np.asarray(schedule(steps / 1000.0)),
                                table[steps])
  assert float(schedule(1.0)) == table[-1]
  # Step indices come back exactly from the table's levels.
  np.testing.assert_array_equal(
      np.asarray(discrete.step_from_logsnr(jnp.asarray(table))),
      np.arange(1000, dtype=np.float32))


@pytest.mark.parametrize("name", ["fast27", "smart27", "smart50", "smart100",
                                  "smart185"])
def test_respacing_presets_match_diffusers_lists(name):
  expected = getattr(if_timesteps, f"{name}_timesteps")
  assert discrete.respaced_steps(name) == list(expected)


def test_respacing_errors():
  with pytest.raises(ValueError, match="Unknown respacing 'smart9'"):
    discrete.respaced_steps("smart9")
  with pytest.raises(ValueError, match="decreasing"):
    discrete.respaced_steps("steps:10,20")
  assert discrete.respaced_steps("steps:999,500,0") == [999, 500, 0]


def if_scheduler():
  # IF's scheduler (its pipeline tests' settings, with stage I's cap 1.5 on
  # the dynamic threshold so the cap is exercised).
  return diffusers.DDPMScheduler(
      num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
      thresholding=True, dynamic_thresholding_ratio=0.95,
      sample_max_value=1.5, prediction_type="epsilon",
      variance_type="learned_range")


@pytest.mark.parametrize("sr", [False, True], ids=["stage1", "stage2"])
def test_ancestral_sampling_matches_if_pipeline(sr):
  """Same noise draws and steps as diffusers' IF pipelines -> same images."""
  model = diffusers_unet(sr, seed=3)
  net, params = converted(model)
  b, length, res, low_res = 2, 5, 16, 8
  steps = [999, 800, 600, 300, 100, 0]
  rng = np.random.default_rng(4)
  text = rng.standard_normal((b, length, 24)).astype(np.float32)
  neg = rng.standard_normal((b, length, 24)).astype(np.float32)
  low = np.clip(rng.standard_normal((b, low_res, low_res, 3)), -1, 1).astype(
      np.float32)

  gen = torch.Generator().manual_seed(0)
  nchw = (b, 3, res, res)
  draws = {"init": torch.randn(nchw, generator=gen)}
  if sr:
    draws["aug"] = torch.randn(nchw, generator=gen)
  draws["steps"] = torch.stack(
      [torch.randn(nchw, generator=gen) for _ in steps[:-1]]
      + [torch.zeros(nchw)])
  noise = {k: jnp.asarray(np.moveaxis(v.numpy(), -3, -1))
           for k, v in draws.items()}

  common = dict(unet=model, scheduler=if_scheduler(), tokenizer=None,
                text_encoder=None, safety_checker=None,
                feature_extractor=None, watermarker=None,
                requires_safety_checker=False)
  call = dict(prompt_embeds=torch.from_numpy(text),
              negative_prompt_embeds=torch.from_numpy(neg),
              timesteps=steps, guidance_scale=7.0, output_type="pt",
              generator=torch.Generator().manual_seed(0), height=res,
              width=res)
  if sr:
    pipe = diffusers.IFSuperResolutionPipeline(
        image_noising_scheduler=diffusers.DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        **common)
    call.update(image=torch.from_numpy(low).permute(0, 3, 1, 2),
                noise_level=250)
  else:
    pipe = diffusers.IFPipeline(**common)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipe(**call).images.permute(0, 2, 3, 1).numpy()

  stage = stage_lib.Stage(unet=net, resolution=res,
                          lowres_resolution=low_res if sr else 0,
                          schedule="discrete_cosine",
                          aug_schedule="discrete_cosine")
  everything = jnp.ones((b, length), bool)    # IF's pipelines pass no mask
  inputs = stage_lib.SampleInputs(
      jnp.asarray(text), everything, lowres=jnp.asarray(low) if sr else None,
      negative_text=jnp.asarray(neg), negative_mask=everything)
  settings = stage_lib.StageSettings(
      sampler="ancestral", guidance_scale=7.0, threshold="dynamic",
      percentile=95.0, threshold_max=1.5, aug_level=0.25,
      timesteps="steps:" + ",".join(map(str, steps)))
  ours = stage.sample(params, inputs, jax.random.PRNGKey(0), settings,
                      noise=noise)
  # Measured 2.5e-5 (float32 CPU, 6 steps, guidance 7, images in [-1, 1]).
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_learned_variance_steers_ancestral_sampling_only():
  """IF's variance channels set the ancestral step's variance; DDIM and
  DPM-Solver++ are deterministic given eps and ignore them."""
  net, params = converted(diffusers_unet(False, seed=5))
  rng = np.random.default_rng(6)
  text = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
  inputs = stage_lib.SampleInputs(text, jnp.ones((2, 5), bool))
  stage = stage_lib.Stage(unet=net, resolution=16, schedule="discrete_cosine")
  # Other variance outputs: the conv_out channels past the first three.
  shifted = jax.tree_util.tree_map(jnp.asarray, params)
  shifted["conv_out"] = {
      "kernel": shifted["conv_out"]["kernel"].at[..., 3:].multiply(-3.0),
      "bias": shifted["conv_out"]["bias"].at[3:].add(0.7)}
  for sampler, same in [("ddim", True), ("dpmpp_2m", True),
                        ("ancestral", False)]:
    settings = stage_lib.StageSettings(
        sampler=sampler, guidance_scale=3.0, threshold="none",
        timesteps="steps:999,700,400,100,0")
    out = [np.asarray(stage.sample(p, inputs, jax.random.PRNGKey(1), settings))
           for p in (params, shifted)]
    diff = float(np.abs(out[0] - out[1]).max())
    assert (diff == 0.0) == same, (sampler, diff)


@pytest.mark.parametrize("name,published", [("IF-I-XL", 4.3e9),
                                            ("IF-II-L", 1.2e9)])
def test_published_sizes_and_every_tensor_maps(name, published):
  """eval_shape only: no memory. diffusers builds the same config on the
  meta device; every tensor of its state dict lands on one of our params
  with the right shape, and every param of ours is hit once."""
  cfg = convert_if.IF_CONFIGS[name]
  fields = convert_if.unet_config_to_model(cfg)
  res = fields.pop("resolution")
  net = UNet(**fields, dtype="bfloat16")
  b, ch = 1, fields["in_channels"]
  kw = {}
  if fields["lowres_cond"]:
    kw = dict(lowres=jnp.zeros((b, res, res, ch)), aug_logsnr=jnp.zeros((b,)))
  shapes = nn.unbox(jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), jnp.zeros((b, res, res, ch)), jnp.zeros((b,)),
      jnp.zeros((b, 4, 4096)), jnp.ones((b, 4), bool), **kw))["params"])
  ours = {tuple(k.key for k in path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(shapes)[0]}
  count = sum(int(np.prod(s)) for s in ours.values())
  assert abs(count / published - 1) < 0.02, count

  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(
        **{k: v for k, v in cfg.items() if not k.startswith("_")})
  hit = set()
  for key, tensor in ref.state_dict().items():
    path, kind = convert_if.map_key(key, len(fields["channel_mult"]))
    shape = tuple(tensor.shape)
    if kind == "dense":
      shape = shape[::-1]
    elif kind == "conv":
      shape = (shape[2], shape[3], shape[1], shape[0])
    assert ours[path] == shape, key
    assert path not in hit, key
    hit.add(path)
  assert hit == set(ours)
  assert sum(p.numel() for p in ref.parameters()) == count
