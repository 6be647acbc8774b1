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


@pytest.mark.parametrize("sr", [False, True], ids=["stage1", "stage2"])
def test_unet_matches_diffusers(sr):
  model = diffusers_unet(sr)
  net, params = converted(model)
  b, length, res = 2, 7, 16
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, res, res, 3)).astype(np.float32)
  text = rng.standard_normal((b, length, 24)).astype(np.float32)
  mask = np.ones((b, length), bool)
  mask[0, 4:] = False                       # a padded caption
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
