"""channel_sum / add_bias / layers.Conv: the fast channel sums are the sums."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import channel_sum as cs
from imagen_jax.models import layers


@pytest.mark.parametrize("shape", [(8, 32, 32, 64), (8, 8, 8, 192), (3, 5, 7),
                                   (136, 24), (24,)])
def test_channel_sum_equals_the_plain_sum(shape):
  # Sizes that take the two-stage path (M % 128 == 0) and ones that do not.
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 3.0
  got = jax.jit(cs.channel_sum)(x)
  want = np.asarray(x, np.float64).reshape(-1, shape[-1]).sum(0)
  assert got.shape == (shape[-1],) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 1024, 64), (8, 64, 192), (2, 100, 8)])
def test_channel_sum_per_example_equals_the_plain_sum(shape):
  x = jax.random.normal(jax.random.PRNGKey(1), shape).astype(jnp.bfloat16)
  got = jax.jit(cs.channel_sum_per_example)(x)
  want = np.asarray(x.astype(jnp.float32), np.float64).sum(1)
  assert got.shape == (shape[0], shape[2]) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_bias_gradients_match_autodiff(dtype):
  y = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 32)).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(3), (32,))
  w = jax.random.normal(jax.random.PRNGKey(4), y.shape).astype(dtype)

  def loss(add):
    return lambda y, b: jnp.sum((add(y, b) * w).astype(jnp.float32))

  plain = lambda y, b: y + b.astype(y.dtype)
  got = jax.grad(loss(cs.add_bias), argnums=(0, 1))(y, b)
  want = jax.grad(loss(plain), argnums=(0, 1))(y, b)
  assert got[1].dtype == jnp.float32
  np.testing.assert_array_equal(got[0], want[0])
  # Summed in float32 whatever the dtype: in bf16 autodiff's own sum is
  # rounded (10% off here); ours is the exact sum to float32 rounding.
  exact = np.asarray(w.astype(jnp.float32), np.float64).reshape(-1, 32).sum(0)
  np.testing.assert_allclose(got[1], exact, rtol=1e-5, atol=1e-3)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kernel,strides", [(3, 1), (3, 2), (1, 1)])
def test_conv_is_flax_conv(kernel, strides):
  """Same parameter tree and outputs as nn.Conv: checkpoints carry over."""
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 6))
  ours = layers.conv(10, jnp.float32, kernel=kernel, strides=strides)
  ref = nn.Conv(10, (kernel, kernel), strides=(strides, strides),
                padding="SAME")
  params = nn.unbox(ours.init(jax.random.PRNGKey(6), x))
  ref_params = ref.init(jax.random.PRNGKey(6), x)
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, ref_params))
  params = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(7), p.shape), params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
  g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
