"""Kernel implementations against the reference; the reference against flax/numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import kernels
from imagen_jax.kernels import channel_sum
from imagen_jax.kernels import reference
from imagen_jax.models import layers

# Every implementation this backend can run, compared with the reference.
IMPLS = ["xla_cpu"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
REF = reference


def _rand(seed, shape, dtype=jnp.float32, scale=1.0, mean=0.0):
  rs = np.random.RandomState(seed)
  return jnp.asarray(rs.standard_normal(shape) * scale + mean, dtype)


def _close_trees(got, want, rtol, atol_rel, floor=1e-6):
  """Leaves within rtol, or atol_rel of the leaf's largest value (>= floor)."""
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    np.testing.assert_allclose(
        a, b, rtol=rtol, atol=atol_rel * max(float(np.abs(b).max()), floor))


def _value_and_grads(fn, args, probe):
  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) * probe)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(
      *args)


def test_auto_resolves_per_backend_and_bad_names_are_one_line():
  assert kernels.resolve("auto") == ("xla_cpu" if jax.default_backend() == "cpu"
                                     else "reference")
  for name in kernels.IMPLEMENTATIONS:
    mod = kernels.get(name)
    for fn in ("bias_add", "modulate", "group_norm_act", "attention"):
      assert callable(getattr(mod, fn))
  with pytest.raises(ValueError, match="model.kernels='nope'; use one of auto"):
    kernels.get("nope")


@pytest.mark.parametrize("shape", [(4, 32, 32, 24), (3, 7, 5), (1000, 16)])
def test_channel_sum_equals_the_plain_sum(shape):
  x = _rand(0, shape)
  np.testing.assert_allclose(channel_sum.channel_sum(x),
                             np.asarray(x, np.float64).reshape(-1, shape[-1])
                             .sum(0), rtol=1e-5, atol=1e-4)
  b = x.reshape(shape[0], -1, shape[-1])
  np.testing.assert_allclose(channel_sum.channel_sum_per_example(b),
                             np.asarray(b, np.float64).sum(1),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_add(impl, activation, dtype):
  y = _rand(1, (2, 8, 8, 16), dtype, scale=2.0)
  bias = _rand(2, (16,))
  probe = _rand(3, y.shape)
  fn = lambda impl_mod: (lambda y, b: impl_mod.bias_add(y, b, activation))
  got = _value_and_grads(fn(kernels.get(impl)), (y, bias), probe)
  want = _value_and_grads(fn(REF), (y, bias), probe)
  assert got[1][0].dtype == dtype and got[1][1].dtype == jnp.float32
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  _close_trees(got, want, rtol=tol, atol_rel=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_modulate(impl, dtype):
  x = _rand(4, (2, 6, 6, 8), dtype)
  scale, shift = _rand(5, (2, 8)), _rand(6, (2, 8))
  probe = _rand(7, x.shape)
  got = _value_and_grads(kernels.get(impl).modulate, (x, scale, shift), probe)
  want = _value_and_grads(REF.modulate, (x, scale, shift), probe)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  _close_trees(got, want, rtol=tol, atol_rel=tol)


def _gn(mod, groups, activation, dtype=None):
  return lambda x, s, t: mod.group_norm_act(
      x, s, t, num_groups=groups, activation=activation, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_group_norm_act(impl, activation, groups):
  x = _rand(8, (3, 5, 4, 16), scale=2.5, mean=1.5)
  scale, shift = _rand(9, (3, 16)), _rand(10, (3, 16))
  probe = _rand(11, x.shape)
  got = _value_and_grads(_gn(kernels.get(impl), groups, activation),
                         (x, scale, shift), probe)
  want = _value_and_grads(_gn(REF, groups, activation), (x, scale, shift),
                          probe)
  _close_trees(got, want, rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_bfloat16_keeps_float32_statistics(impl):
  x = _rand(12, (2, 8, 8, 16), jnp.bfloat16, scale=3.0, mean=2.0)
  scale, shift = _rand(13, (2, 16)), _rand(14, (2, 16))
  probe = _rand(15, x.shape)
  got = _value_and_grads(_gn(kernels.get(impl), 4, "silu"), (x, scale, shift),
                         probe)
  want = _value_and_grads(_gn(REF, 4, "silu"), (x, scale, shift), probe)
  y = kernels.get(impl).group_norm_act(x, scale, shift, num_groups=4)
  assert y.dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
  _close_trees(got, want, rtol=2e-2, atol_rel=2e-2)


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_group_norm_is_accurate_for_a_large_mean(impl):
  """Mean 30, std 0.1: a one-pass float32 variance was off by ~0.04."""
  x = _rand(16, (2, 16, 16, 8), scale=0.1, mean=30.0)
  ones, zeros = jnp.ones((2, 8)), jnp.zeros((2, 8))
  y = kernels.get(impl).group_norm_act(x, ones, zeros, num_groups=2,
                                       epsilon=0.0)
  xd = np.asarray(x, np.float64).reshape(2, 16, 16, 2, 4)
  mean = xd.mean(axis=(1, 2, 4), keepdims=True)
  std = xd.std(axis=(1, 2, 4), keepdims=True)
  want = ((xd - mean) / std).reshape(x.shape)
  np.testing.assert_allclose(y, want, atol=2e-3)
  # The gradient too: d sum(y * probe) / dx against the float32 reference
  # at a centred input, where float32 is exact enough (GroupNorm is
  # shift-invariant, so the gradient is the same).
  probe = _rand(17, x.shape)
  g = jax.grad(lambda x: jnp.sum(kernels.get(impl).group_norm_act(
      x, ones, zeros, num_groups=2) * probe))(x)
  g0 = jax.grad(lambda x: jnp.sum(REF.group_norm_act(
      x, ones, zeros, num_groups=2) * probe))(x - 30.0)
  np.testing.assert_allclose(g, g0, rtol=2e-3, atol=2e-3 * float(
      jnp.abs(g0).max()))


def test_group_norm_module_is_flax_group_norm_then_film_then_silu():
  """An independent reference: flax's GroupNorm, then FiLM, then SiLU."""
  x = _rand(18, (2, 6, 6, 32), scale=2.0, mean=1.0)
  film_scale, film_shift = _rand(19, (2, 32)), _rand(20, (2, 32))
  params = {"params": {"scale": _rand(21, (32,)), "bias": _rand(22, (32,))}}
  flax_gn = nn.GroupNorm(num_groups=8, epsilon=1e-5)

  def flax_fn(p, x):
    h = flax_gn.apply(p, x)
    h = h * (1 + film_scale[:, None, None]) + film_shift[:, None, None]
    return jax.nn.silu(h)

  probe = _rand(23, x.shape)
  want = _value_and_grads(flax_fn, (params, x), probe)
  for impl in ["reference"] + IMPLS:
    ours = layers.GroupNorm(num_groups=8, kernels=impl)
    got = _value_and_grads(lambda p, x: ours.apply(  # pylint: disable=cell-var-from-loop
        p, x, film=(film_scale, film_shift), activation="silu"),
                           (params, x), probe)
    _close_trees(got, want, rtol=1e-3, atol_rel=1e-4)


def test_group_norm_bad_arguments_are_one_line_errors():
  x = jnp.ones((1, 2, 2, 6))
  for impl in ["reference"] + IMPLS:
    with pytest.raises(ValueError, match="6 channels are not divisible into 4"):
      kernels.get(impl).group_norm_act(x, jnp.ones(6), jnp.zeros(6),
                                       num_groups=4)
    with pytest.raises(ValueError, match="activation='relu'"):
      kernels.get(impl).group_norm_act(x, jnp.ones(6), jnp.zeros(6),
                                       num_groups=3, activation="relu")


def _qkv(t, s, dtype=jnp.float32, n=2, h=16):
  return (_rand(30, (3, t, n, h), dtype), _rand(31, (3, s, n, h), dtype, 2.0),
          _rand(32, (3, s, n, h), dtype), _rand(33, (3, t, n, h)))


def test_reference_attention_is_the_textbook_formula():
  q, k, v, _ = _qkv(5, 7)
  mask = jnp.arange(7)[None, :] < jnp.array([7, 3, 1])[:, None]
  qd, kd, vd = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", qd, kd) / 4.0
  logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(REF.attention(q, k, v, mask),
                             np.einsum("bnts,bsnh->btnh", w, vd),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,s,masked", [(64, 64, False), (24, 17, True),
                                        (1, 9, True), (40, 40, True)])
def test_attention_values_and_gradients(impl, t, s, masked):
  # S = 64 takes xla_cpu's halving row max, S = 17 / 9 the plain one.
  q, k, v, probe = _qkv(t, s)
  mask = (jnp.arange(s)[None, :] < jnp.array([s, 3, 1])[:, None]
          if masked else None)
  got = _value_and_grads(lambda q, k, v: kernels.get(impl).attention(
      q, k, v, mask), (q, k, v), probe)
  want = _value_and_grads(lambda q, k, v: REF.attention(q, k, v, mask),
                          (q, k, v), probe)
  _close_trees(got, want, rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_fully_masked_rows_are_uniform_and_send_no_gradient_to_q_and_k(impl):
  q, k, v, probe = _qkv(8, 16)
  mask = jnp.zeros((3, 16), bool).at[1, :5].set(True)   # rows 0, 2: nothing
  fn = kernels.get(impl).attention
  out = fn(q, k, v, mask)
  np.testing.assert_allclose(out[0], jnp.broadcast_to(v[0].mean(0),
                                                      out[0].shape),
                             rtol=1e-5, atol=1e-6)
  _, (dq, dk, dv) = _value_and_grads(lambda q, k, v: fn(q, k, v, mask),
                                     (q, k, v), probe)
  for b in (0, 2):
    assert float(jnp.abs(dq[b]).max()) == 0.0
    assert float(jnp.abs(dk[b]).max()) == 0.0
    assert float(jnp.abs(dv[b]).max()) > 0.0
  assert float(jnp.abs(dk[1, 5:]).max()) == 0.0     # masked keys of row 1
  # Huge logits stay finite.
  val, grads = _value_and_grads(lambda q, k, v: fn(q, k, v, mask),
                                (1e4 * q, k, v), probe)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (val, *grads))


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_bfloat16(impl):
  q, k, v, probe = _qkv(32, 32, jnp.bfloat16)
  mask = jnp.arange(32)[None, :] < jnp.array([32, 9, 20])[:, None]
  got = _value_and_grads(lambda q, k, v: kernels.get(impl).attention(
      q, k, v, mask), (q, k, v), probe)
  want = _value_and_grads(lambda q, k, v: REF.attention(q, k, v, mask),
                          *[(q.astype(jnp.float32), k.astype(jnp.float32),
                             v.astype(jnp.float32)), probe])
  assert kernels.get(impl).attention(q, k, v, mask).dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in got[1])
  _close_trees(got, want, rtol=3e-2, atol_rel=3e-2)


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
@pytest.mark.parametrize("t,s", [(1, 17), (16, 1), (1, 1)])
def test_attention_with_one_position_trains_in_bfloat16(impl, t, s):
  """Attention pooling's one query, a one-token context: bf16 gradients.

  jax.nn.dot_product_attention's bfloat16 backward does not compile on
  XLA:CPU for these shapes; every implementation must, and agree with
  dot_product_attention in float32.
  """
  q, k, v, probe = _qkv(t, s)
  mask = jnp.arange(s)[None, :] < jnp.array([s, 1, 0])[:, None]

  def dpa(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                        implementation="xla")

  fn = lambda q, k, v: kernels.get(impl).attention(q, k, v, mask)
  want = _value_and_grads(dpa, (q, k, v), probe)
  # With one key dq and dk are exactly zero: compare on the scale of dv.
  floor = float(jnp.abs(want[1][2]).max())
  _close_trees(_value_and_grads(fn, (q, k, v), probe), want, rtol=1e-4,
               atol_rel=1e-5, floor=floor)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = _value_and_grads(fn, low, probe)
  assert all(g.dtype == jnp.bfloat16 for g in got[1])
  _close_trees(got, want, rtol=3e-2, atol_rel=3e-2, floor=floor)


@pytest.mark.parametrize("t,s", [(5, 7), (1, 17), (16, 9), (4, 6)])
def test_cudnn_even_length_padding_is_exact(t, s, monkeypatch):
  """cudnn.py pads odd masked sequences; checked here with XLA's kernel.

  Rows with a valid key, a fully masked row (uniform over the real values)
  and every gradient must be the unpadded attention's.
  """
  from imagen_jax.kernels import cudnn
  seen = []
  dpa = jax.nn.dot_product_attention

  def recording(q, k, *args, **kwargs):
    seen.append((q.shape[1], k.shape[1]))
    return dpa(q, k, *args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  q, k, v, probe = _qkv(t, s)
  mask = jnp.arange(s)[None, :] < jnp.array([s, 1, 0])[:, None]
  got = _value_and_grads(lambda q, k, v: cudnn.padded_attention(
      q, k, v, mask, implementation="xla"), (q, k, v), probe)
  assert seen and all(a % 2 == 0 and b % 2 == 0 for a, b in seen), seen
  want = _value_and_grads(lambda q, k, v: REF.attention(q, k, v, mask),
                          (q, k, v), probe)
  assert got[1][0].shape == q.shape and got[1][1].shape == k.shape
  floor = float(jnp.abs(want[1][2]).max())
  _close_trees(got, want, rtol=1e-5, atol_rel=1e-6, floor=floor)


def test_attention_module_is_flax_multi_head_attention():
  """Same parameter tree as nn.MultiHeadDotProductAttention, same function."""
  x, ctx = _rand(40, (2, 6, 32)), _rand(41, (2, 5, 24))
  mask = jnp.arange(5)[None, :] < jnp.array([5, 2])[:, None]
  ours = layers.Attention(head_dim=8)
  params = ours.init(jax.random.PRNGKey(0), x, ctx, mask)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * _rand(42, p.shape), nn.unbox(params))
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=24,
                                             out_features=32)
  assert (jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      nn.unbox(flax_mha.init(jax.random.PRNGKey(0), x, ctx))))
  want = flax_mha.apply(params, x, ctx, mask=mask[:, None, None, :])
  for impl in ["reference"] + IMPLS:
    got = layers.Attention(head_dim=8, kernels=impl).apply(params, x, ctx, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_dense_and_conv_are_flax_layers(activation):
  x = _rand(50, (2, 8, 8, 6))
  dense = layers.Dense(10, activation=activation)
  p = jax.tree_util.tree_map(lambda a: a + 0.1, nn.unbox(
      dense.init(jax.random.PRNGKey(0), x)))
  want = nn.Dense(10).apply(p, x)
  want = want if activation is None else nn.gelu(want)
  for impl in ["reference"] + IMPLS:
    got = layers.Dense(10, activation=activation, kernels=impl).apply(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  conv = layers.Conv(7, kernel_size=3, strides=2)
  p = jax.tree_util.tree_map(lambda a: a + 0.1, nn.unbox(
      conv.init(jax.random.PRNGKey(0), x)))
  want = nn.Conv(7, (3, 3), strides=(2, 2), padding="SAME").apply(p, x)
  for impl in ["reference"] + IMPLS:
    got = layers.Conv(7, 3, 2, kernels=impl).apply(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
