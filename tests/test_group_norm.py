"""The fused GroupNorm (hand-written VJP) against flax and plain autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import layers
from imagen_jax.models.group_norm import group_norm_act
from imagen_jax.models.group_norm import group_norm_act_reference


def _inputs(seed, shape=(3, 5, 4, 16), dtype=jnp.float32):
  rs = np.random.RandomState(seed)
  b, _, _, c = shape
  # A non-zero mean and a scale away from 1 exercise the mean/var paths.
  x = jnp.asarray(rs.randn(*shape) * 2.5 + 1.5, dtype)
  scale = jnp.asarray(rs.randn(b, c), jnp.float32)
  shift = jnp.asarray(rs.randn(b, c), jnp.float32)
  probe = jnp.asarray(rs.randn(*shape), jnp.float32)
  return x, scale, shift, probe


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_value_and_grads_match_autodiff(activation, groups):
  x, scale, shift, probe = _inputs(0)

  def loss(fn):
    return lambda x, s, t: jnp.sum(fn(x, s, t, num_groups=groups,
                                      activation=activation) * probe)

  ours = jax.value_and_grad(loss(group_norm_act), argnums=(0, 1, 2))(
      x, scale, shift)
  ref = jax.value_and_grad(loss(group_norm_act_reference), argnums=(0, 1, 2))(
      x, scale, shift)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-4)
  for got, want in zip(ours[1], ref[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(want).max()))


def test_module_matches_flax_group_norm_with_film_and_silu():
  """Independent reference: flax's GroupNorm, then FiLM, then SiLU."""
  x, film_scale, film_shift, _ = _inputs(1, shape=(2, 6, 6, 32))
  ours = layers.GroupNorm(num_groups=8)
  flax_gn = nn.GroupNorm(num_groups=8, epsilon=1e-5)
  params = ours.init(jax.random.PRNGKey(0), x)
  # Non-trivial gamma / beta, shared by both.
  rs = np.random.RandomState(2)
  params = {"params": {"scale": jnp.asarray(rs.randn(32), jnp.float32),
                       "bias": jnp.asarray(rs.randn(32), jnp.float32)}}

  def ours_fn(p, x):
    return ours.apply(p, x, film=(film_scale, film_shift), activation="silu")

  def flax_fn(p, x):
    h = flax_gn.apply(p, x)
    h = h * (1 + film_scale[:, None, None]) + film_shift[:, None, None]
    return jax.nn.silu(h)

  np.testing.assert_allclose(ours_fn(params, x), flax_fn(params, x),
                             rtol=1e-4, atol=1e-4)
  probe = jnp.asarray(rs.randn(*x.shape), jnp.float32)
  g_ours = jax.grad(lambda p, x: jnp.sum(ours_fn(p, x) * probe), (0, 1))(
      params, x)
  g_flax = jax.grad(lambda p, x: jnp.sum(flax_fn(p, x) * probe), (0, 1))(
      params, x)
  for got, want in zip(jax.tree_util.tree_leaves(g_ours),
                       jax.tree_util.tree_leaves(g_flax)):
    np.testing.assert_allclose(got, want, rtol=1e-3,
                               atol=1e-4 * float(jnp.abs(want).max()))


def test_bfloat16_input_keeps_float32_statistics():
  x, scale, shift, probe = _inputs(3, dtype=jnp.bfloat16)
  y = group_norm_act(x, scale, shift, num_groups=4, activation="silu")
  assert y.dtype == jnp.bfloat16
  ref = group_norm_act_reference(x.astype(jnp.float32), scale, shift,
                                 num_groups=4, activation="silu")
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
  dx = jax.grad(lambda x: jnp.sum(group_norm_act(
      x, scale, shift, num_groups=4).astype(jnp.float32) * probe))(x)
  assert dx.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def test_constant_input_is_finite():
  """Zero variance: epsilon keeps the value and the gradient finite."""
  x = jnp.ones((2, 4, 4, 8), jnp.float32)
  scale, shift = jnp.ones((8,)), jnp.zeros((8,))
  grad = jax.grad(lambda x: jnp.sum(group_norm_act(
      x, scale, shift, num_groups=2, activation="silu")))(x)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_silu_matches_jax_silu_at_extreme_pre_activations():
  """The divide form of SiLU saturates like jax.nn.silu, value and gradient.

  A shift of +-1000 drives exp(-u) to 0 and to inf (the latter must give -0,
  not NaN); +-20 checks the tails where the two forms differ most in float32.
  """
  rs = np.random.RandomState(7)
  x = jnp.asarray(rs.randn(2, 4, 4, 8), jnp.float32)
  scale = jnp.ones((8,))
  for offset in (-1000.0, -20.0, 0.0, 20.0, 1000.0):
    shift = jnp.full((8,), offset)
    ours = lambda x, s=shift: group_norm_act(x, scale, s, num_groups=2,
                                             activation="silu")
    plain = lambda x, s=shift: jax.nn.silu(group_norm_act(
        x, scale, s, num_groups=2))
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-5, atol=1e-6)
    g_ours = jax.grad(lambda x: jnp.sum(ours(x) * x))(x)
    g_plain = jax.grad(lambda x: jnp.sum(plain(x) * x))(x)
    assert bool(jnp.all(jnp.isfinite(g_ours))), offset
    np.testing.assert_allclose(g_ours, g_plain, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(g_plain).max()))


def test_bad_arguments_are_one_line_errors():
  x = jnp.zeros((1, 2, 2, 6))
  with pytest.raises(ValueError, match="6 channels are not divisible into 4"):
    group_norm_act(x, jnp.ones(6), jnp.zeros(6), num_groups=4)
  with pytest.raises(ValueError, match="activation='relu'"):
    group_norm_act(x, jnp.ones(6), jnp.zeros(6), num_groups=3,
                   activation="relu")
