"""U-Net and Efficient U-Net: shapes, conditioning, precision, remat, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import build
from imagen_jax import convert_if
from imagen_jax import parallel
from imagen_jax.models import layers
from tests import helpers

load_config = helpers.load_config

STAGES = ["base64", "sr256", "sr1024"]


@pytest.mark.parametrize("stage", STAGES)
def test_shapes_several_resolutions_and_batches(stage):
  config = load_config(stage)
  module, params, _ = helpers.init_unet(stage)
  apply = helpers.apply_fn(module)
  base_res = int(config.train_crop) or int(config.resolution)
  for res, batch in [(base_res, 1), (base_res, 3), (2 * base_res, 2)]:
    inputs = helpers.random_inputs(build.unet_inputs(config, batch, 5, res))
    out = apply(params, **inputs)
    assert out.shape == (batch, res, res, 3)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_zero_initialised_output():
  module, params, inputs = helpers.init_unet("base64", live=False)
  out = helpers.apply_fn(module)(params, **helpers.random_inputs(inputs))
  np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("stage", STAGES)
def test_padding_has_no_effect_and_null_text_is_finite(stage):
  module, params, inputs = helpers.init_unet(stage, batch=2, text_len=5)
  apply = helpers.apply_fn(module)
  inp = helpers.random_inputs(inputs, valid_tokens=[3, 5])
  out = apply(params, **inp)
  # Append 7 padding tokens with garbage embeddings: nothing may change.
  pad = dict(inp)
  pad["text"] = jnp.concatenate(
      [inp["text"], 100.0 * jax.random.normal(jax.random.PRNGKey(9), (2, 7, inp["text"].shape[-1]))], 1)
  pad["text_mask"] = jnp.concatenate([inp["text_mask"], jnp.zeros((2, 7), bool)], 1)
  # Garbage in already-masked positions must not matter either.
  pad["text"] = pad["text"].at[0, 3:5].set(-50.0)
  out_pad = apply(params, **pad)
  np.testing.assert_allclose(out_pad, out, atol=1e-5, rtol=1e-5)
  # Null text (all masked) is valid and finite, and differs from real text.
  null = dict(inp, text=jnp.zeros_like(inp["text"]),
              text_mask=jnp.zeros_like(inp["text_mask"]))
  out_null = apply(params, **null)
  assert bool(jnp.all(jnp.isfinite(out_null)))
  assert float(jnp.abs(out_null - out).max()) > 1e-3


@pytest.mark.parametrize("stage", STAGES)
def test_text_and_lowres_change_the_output(stage):
  config = load_config(stage)
  module, params, inputs = helpers.init_unet(stage)
  apply = helpers.apply_fn(module)
  inp = helpers.random_inputs(inputs)
  out = apply(params, **inp)
  other_text = dict(inp, text=jax.random.normal(jax.random.PRNGKey(7), inp["text"].shape))
  assert float(jnp.abs(apply(params, **other_text) - out).max()) > 1e-3
  if config.model.lowres_cond:
    other_low = dict(inp, lowres=-inp["lowres"])
    assert float(jnp.abs(apply(params, **other_low) - out).max()) > 1e-3
    other_aug = dict(inp, aug_logsnr=inp["aug_logsnr"] + 3.0)
    assert float(jnp.abs(apply(params, **other_aug) - out).max()) > 1e-4


@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_bfloat16_compute_matches_float32(stage):
  config = load_config(stage)
  module, params, inputs = helpers.init_unet(stage)
  apply = helpers.apply_fn(module)
  inp = helpers.random_inputs(inputs)
  out32 = apply(params, **inp)
  config.model.dtype = "bfloat16"
  module16 = build.build_unet(config.model)
  out16 = helpers.apply_fn(module16)(params, **inp)
  assert out16.dtype == jnp.float32
  # bf16 has an 8-bit mantissa (~0.4% per op); through a deep net ~3% of scale.
  scale = float(jnp.abs(out32).mean())
  assert float(jnp.abs(out16 - out32).mean()) < 0.03 * scale
  # Params stay float32 whatever the compute dtype.
  p16 = nn.unbox(jax.eval_shape(lambda: module16.init(jax.random.PRNGKey(0),
                                                      **inputs)))["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p16))


def _loss(module, params, inp, rng):
  out = module.apply({"params": params}, **inp, train=True,
                     rngs={"dropout": rng})
  return jnp.mean(jnp.square(out - 0.5))


@pytest.mark.parametrize("stage", STAGES)
def test_gradients_reach_every_parameter(stage):
  module, params, inputs = helpers.init_unet(stage)
  inp = helpers.random_inputs(inputs)
  grads = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(
      module, params, inp, jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(p) for p, g in flat if float(jnp.abs(g).max()) == 0.0]
  assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_loss_and_gradients(policy):
  config = load_config("sr256")
  config.model.dropout = 0.1
  module, params, inputs = helpers.init_unet("sr256")
  module = build.build_unet(config.model)
  inp = helpers.random_inputs(inputs)
  rng = jax.random.PRNGKey(3)
  loss, grads = jax.jit(jax.value_and_grad(_loss, argnums=1),
                        static_argnums=0)(module, params, inp, rng)
  config.model.remat = policy
  remat_module = build.build_unet(config.model)
  loss_r, grads_r = jax.jit(jax.value_and_grad(_loss, argnums=1),
                            static_argnums=0)(remat_module, params, inp, rng)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-5)
  for g, gr in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
    np.testing.assert_allclose(gr, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_kernel_implementations_give_the_same_loss_and_gradients(stage):
  # The whole network, not only each kernel (tests/test_kernels.py): the
  # reference and the XLA:CPU implementations are the same function.
  module, params, inputs = helpers.init_unet(stage)
  inp = helpers.random_inputs(inputs)
  rng = jax.random.PRNGKey(5)
  step = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
  loss, grads = step(module.clone(kernels="reference"), params, inp, rng)
  loss_c, grads_c = step(module.clone(kernels="xla_cpu"), params, inp, rng)
  np.testing.assert_allclose(loss_c, loss, rtol=1e-5)
  for g, gc in zip(jax.tree_util.tree_leaves(grads),
                   jax.tree_util.tree_leaves(grads_c)):
    np.testing.assert_allclose(gc, g, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(g).max()) + 1e-7)


# The paper's sizes: base ~2.0B (+-10%), SR 256 ~600M and SR 1024 ~400M (+-15%).
@pytest.mark.parametrize("stage,target,tol", [
    ("base64", 2.0e9, 0.10), ("sr256", 6.0e8, 0.15), ("sr1024", 4.0e8, 0.15)])
def test_paper_param_counts(stage, target, tol):
  config = load_config(stage, "paper")
  module = build.build_unet(config.model)
  n = build.count_params(build.param_shapes(module, build.unet_inputs(config, 1, 8)))
  assert abs(n - target) <= tol * target, f"{stage}: {n / 1e6:.0f}M params"


def _if_stage_config(name):
  """A stage config holding a published IF U-Net's model fields."""
  fields = convert_if.unet_config_to_model(convert_if.IF_CONFIGS[name])
  config = load_config("sr256" if fields["lowres_cond"] else "base64")
  config.resolution = fields.pop("resolution")
  config.lowres_resolution = 64
  for key, value in fields.items():
    config.model[key] = value
  return config


@pytest.mark.parametrize("stage", ["sr256", "IF-I-XL", "IF-II-L"])
def test_params_carry_logical_axis_names(stage):
  config = (_if_stage_config(stage) if stage.startswith("IF")
            else load_config(stage))
  module = build.build_unet(config.model)
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                             **build.unet_inputs(config, 1, 4)))
  specs = nn.get_partition_spec(boxed)["params"]
  flat = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  shapes = jax.tree_util.tree_leaves(nn.unbox(boxed)["params"])
  assert len(flat) == len(shapes)
  known = {name for name, _ in parallel.DEFAULT_RULES}
  for (path, spec), shape in zip(flat, shapes):
    where = jax.tree_util.keystr(path)
    # Every parameter is boxed with one name (or None) per axis, the names
    # are ones the mesh rules map, and every kernel and embedding (rank >= 2)
    # has at least one named axis.
    assert isinstance(spec, jax.sharding.PartitionSpec), where
    assert len(spec) == len(shape.shape), where
    assert {n for n in spec if n is not None} <= known, (where, spec)
    if len(shape.shape) >= 2:
      assert any(name is not None for name in spec), where


def _apply(config, **overrides):
  # Shape checks run at trace time: eval_shape raises them without compiling.
  module = build.build_unet(config.model)
  inp = dict(build.unet_inputs(config, 2, 6))
  inp.update(overrides)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inp))


def test_bad_inputs_give_one_line_errors():
  base = load_config("base64")
  sr = load_config("sr256")
  cases = [
      (base, dict(x=jnp.zeros((2, 16, 16, 4))), "Image has 4 channels but the U-Net expects in_channels=3"),
      (base, dict(x=jnp.zeros((2, 17, 17, 3))), "Resolution 17x17 is not divisible by 2"),
      (base, dict(text=jnp.zeros((2, 6, 48))), "width 48 but the U-Net was configured with text_dim=32"),
      (sr, dict(lowres=None), "super-resolution U-Net .* pass the low-res image"),
  ]
  for config, overrides, match in cases:
    with pytest.raises(ValueError, match=match) as err:
      _apply(config, **overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape,features", [((2, 4, 4, 3), 5), ((3, 6, 8, 16), 8),
                                            ((1, 1, 1, 4), 4)])
def test_upsample_equals_plain_nearest_then_conv(shape, features):
  """Same params (init included), outputs and gradients as the plain layer."""
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(*shape), jnp.float32)
  ours, plain = layers.Upsample(features), layers.UpsampleReference(features)
  p_ours = ours.init(jax.random.PRNGKey(3), x)
  p_plain = plain.init(jax.random.PRNGKey(3), x)
  for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_plain)):
    np.testing.assert_array_equal(a, b)
  assert (jax.tree_util.tree_structure(nn.unbox(p_ours)) ==
          jax.tree_util.tree_structure(nn.unbox(p_plain)))
  # A random bias and kernel, so every tap and the bias are exercised.
  p = jax.tree_util.tree_map(lambda t: jnp.asarray(rs.randn(*t.shape), t.dtype),
                             nn.unbox(p_plain))
  y = ours.apply(p, x)
  assert y.shape == (shape[0], 2 * shape[1], 2 * shape[2], features)
  np.testing.assert_allclose(y, plain.apply(p, x), rtol=1e-5, atol=1e-5)
  ct = jnp.asarray(rs.randn(*y.shape), jnp.float32)
  g_ours = jax.grad(lambda p, x: jnp.sum(ours.apply(p, x) * ct), (0, 1))(p, x)
  g_plain = jax.grad(lambda p, x: jnp.sum(plain.apply(p, x) * ct), (0, 1))(p, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # bfloat16 compute stays within bf16 tolerance of the float32 result.
  y16 = layers.Upsample(features, jnp.bfloat16).apply(p, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y, rtol=0.05,
                             atol=0.05 * float(jnp.abs(y).max()))


def test_text_layers_make_the_conditioning_order_aware():
  """Cross-attention and pooling see a set of tokens; text_layers add order.

  Without them, reversing the real tokens (mask reversed alike) leaves the
  output unchanged; with them it changes it, and padding still has no
  effect.
  """
  def reversed_tokens(inp, n):
    text = inp["text"].at[:, :n].set(inp["text"][:, :n][:, ::-1])
    return dict(inp, text=text)

  outs = {}
  for layers_ in (0, 2):
    config = load_config("base64")
    config.model.text_layers = layers_
    module, params, inputs = helpers.init_unet(config, batch=2, text_len=6)
    apply = helpers.apply_fn(module)
    inp = helpers.random_inputs(inputs, valid_tokens=[4, 4])
    out = apply(params, **inp)
    outs[layers_] = float(jnp.abs(apply(params, **reversed_tokens(inp, 4))
                                  - out).max())
    pad = dict(inp, text=inp["text"].at[:, 4:].set(50.0))
    np.testing.assert_allclose(apply(params, **pad), out, atol=1e-5, rtol=1e-5)
    has = "text_layers" in params
    assert has == bool(layers_)
  assert outs[0] < 1e-5, outs
  assert outs[2] > 1e-3, outs


@pytest.mark.parametrize("skip", [False, True])
def test_full_res_skip_gives_the_output_a_full_resolution_path(skip):
  """With every D/U block zeroed, only the full-resolution skip links input
  and output: a poked input pixel then moves the output around it (the 5x5
  reach of the input and output convolutions; elsewhere only through the
  output GroupNorm's statistics); without the skip the output does not
  depend on the input at all."""
  config = load_config("sr256")
  config.model.full_res_skip = skip
  module, params, inputs = helpers.init_unet(config, batch=1, text_len=4)
  params = {k: (jax.tree_util.tree_map(jnp.zeros_like, v)
                if k.startswith(("down_", "up_")) else v)
            for k, v in params.items()}
  assert ("conv_out" in params
          and params["conv_out"]["kernel"].shape[2]
          == (2 if skip else 1) * config.model.base_channels)
  apply = helpers.apply_fn(module)
  inp = helpers.random_inputs(inputs)
  out = apply(params, **inp)
  r, c = 9, 13
  poked = dict(inp, x=inp["x"].at[0, r, c, :].add(3.0))
  diff = np.abs(np.asarray(apply(params, **poked) - out))[0].max(-1)  # [H, W]
  if not skip:
    assert diff.max() < 1e-6
    return
  far = diff.copy()
  far[r - 2:r + 3, c - 2:c + 3] = 0.0
  assert diff[r - 2:r + 3, c - 2:c + 3].max() > 10 * far.max(), (
      diff[r - 2:r + 3, c - 2:c + 3].max(), far.max())


@pytest.mark.parametrize("family", ["imagen", "if"])
def test_full_res_skip_needs_the_efficient_layout(family):
  config = load_config("base64")
  config.model.full_res_skip = True
  config.model.family = family
  with pytest.raises(ValueError, match="full_res_skip"):
    helpers.init_unet(config)
