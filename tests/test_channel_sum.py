"""channel_sum, add_bias, bias_gelu, modulate, layers.Conv and layers.Dense:
the fast channel sums are the sums, and the gradients are autodiff's."""

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_gelu_is_flax_gelu_with_its_gradients(dtype):
  # Pre-activations over [-6, 6]: both tails and the curved middle.
  y = (3.0 * jax.random.normal(jax.random.PRNGKey(8), (4, 8, 8, 64))
       ).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(9), (64,))
  w = jax.random.normal(jax.random.PRNGKey(10), y.shape).astype(dtype)
  plain = lambda y, b: nn.gelu(y + b.astype(y.dtype))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  got = jax.jit(cs.bias_gelu)(y, b)
  assert got.dtype == dtype
  np.testing.assert_allclose(got.astype(jnp.float32),
                             plain(y, b).astype(jnp.float32),
                             rtol=tol, atol=tol)

  def loss(f):
    return lambda y, b: jnp.sum((f(y, b) * w).astype(jnp.float32))

  got = jax.jit(jax.grad(loss(cs.bias_gelu), argnums=(0, 1)))(y, b)
  # The reference in float32 (autodiff's bf16 bias sum is itself rounded).
  yf, wf = y.astype(jnp.float32), w.astype(jnp.float32)
  want = jax.grad(lambda y, b: jnp.sum(plain(y, b) * wf), argnums=(0, 1))(
      yf, b)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  np.testing.assert_allclose(got[0].astype(jnp.float32), want[0],
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(got[1], want[1], rtol=tol,
                             atol=tol * np.abs(want[1]).max())


def test_modulate_is_film_with_its_gradients():
  x = jax.random.normal(jax.random.PRNGKey(11), (4, 16, 16, 32))
  scale = jax.random.normal(jax.random.PRNGKey(12), (4, 32))
  shift = jax.random.normal(jax.random.PRNGKey(13), (4, 32))
  w = jax.random.normal(jax.random.PRNGKey(14), x.shape)
  plain = lambda x, s, t: x * (1 + s[:, None, None]) + t[:, None, None]
  np.testing.assert_allclose(jax.jit(cs.modulate)(x, scale, shift),
                             plain(x, scale, shift), rtol=1e-6, atol=1e-6)

  def loss(f):
    return lambda *a: jnp.sum(f(*a) * w)

  got = jax.jit(jax.grad(loss(cs.modulate), argnums=(0, 1, 2)))(x, scale, shift)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, scale, shift)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_dense_is_flax_dense(activation):
  """Same parameter tree, outputs and gradients as nn.Dense (+ nn.gelu)."""
  x = jax.random.normal(jax.random.PRNGKey(15), (2, 4, 4, 24))
  ours = layers.dense(40, jnp.float32, activation=activation)
  ref = nn.Dense(40)
  post = nn.gelu if activation else (lambda v: v)
  params = nn.unbox(ours.init(jax.random.PRNGKey(16), x))
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, ref.init(jax.random.PRNGKey(16), x)))
  params = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(17), p.shape), params)
  run = lambda p: ours.apply(p, x)
  run_ref = lambda p: post(ref.apply(p, x))
  np.testing.assert_allclose(run(params), run_ref(params), rtol=1e-5,
                             atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(run(p) ** 2))(params)
  g_ref = jax.grad(lambda p: jnp.sum(run_ref(p) ** 2))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="activation='relu'"):
    layers.dense(4, jnp.float32, activation="relu").init(
        jax.random.PRNGKey(0), x)
