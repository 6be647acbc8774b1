"""attention_core.attend (hand VJP) against autodiff of the textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import attention_core


def _inputs(t, s, n=2, h=16, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (3, t, n, h)).astype(dtype)
  k = (2.0 * jax.random.normal(ks[1], (3, s, n, h))).astype(dtype)
  v = jax.random.normal(ks[2], (3, s, n, h)).astype(dtype)
  g = jax.random.normal(ks[3], (3, t, n, h)).astype(dtype)
  return q, k, v, g


def _value_and_grads(fn, q, k, v, g, mask):
  loss = lambda q, k, v: jnp.sum((fn(q, k, v, mask) * g).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("t,s,masked", [(64, 64, False), (24, 17, True),
                                        (1, 9, True), (40, 40, True)])
def test_values_and_gradients_match_autodiff(t, s, masked):
  # S = 64 takes the halving row max, S = 17 / 9 the plain one.
  q, k, v, g = _inputs(t, s)
  mask = None
  if masked:
    lengths = jnp.array([s, 3, 1])
    mask = jnp.arange(s)[None, :] < lengths[:, None]
  got_out = attention_core.attend(q, k, v, mask)
  want_out = attention_core.attend_reference(q, k, v, mask)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
  got, want = (_value_and_grads(f, q, k, v, g, mask) for f in (
      attention_core.attend, attention_core.attend_reference))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_masked_keys_get_no_gradient_and_change_nothing():
  q, k, v, g = _inputs(8, 12)
  mask = jnp.arange(12)[None, :] < jnp.array([5, 12, 7])[:, None]
  _, (dq, dk, dv) = _value_and_grads(attention_core.attend, q, k, v, g, mask)
  dead = ~mask[:, :, None, None]
  assert float(jnp.max(jnp.abs(jnp.where(dead, dk, 0)))) == 0.0
  assert float(jnp.max(jnp.abs(jnp.where(dead, dv, 0)))) == 0.0
  # Replacing masked keys / values by garbage leaves the output unchanged.
  noise = 1e3 * jax.random.normal(jax.random.PRNGKey(9), k.shape)
  out = attention_core.attend(q, k, v, mask)
  out2 = attention_core.attend(q, jnp.where(dead, noise, k),
                               jnp.where(dead, noise, v), mask)
  np.testing.assert_array_equal(out, out2)


def test_fully_masked_rows_and_huge_logits_stay_finite():
  q, k, v, g = _inputs(8, 16)
  mask = jnp.zeros((3, 16), bool).at[1].set(True)   # rows 0 and 2: nothing
  val, grads = _value_and_grads(attention_core.attend, 1e4 * q, k, v, g, mask)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (val, *grads))
  out = attention_core.attend(q, k, v, mask)
  # All masked: uniform weights over the keys, as with jax.nn.softmax.
  np.testing.assert_allclose(out[0], jnp.broadcast_to(v[0].mean(0), out[0].shape),
                             rtol=1e-5, atol=1e-6)


def test_bfloat16_matches_float32_within_bf16_tolerance():
  q, k, v, g = _inputs(32, 32, dtype=jnp.bfloat16)
  out = attention_core.attend(q, k, v, None)
  assert out.dtype == jnp.bfloat16
  ref = attention_core.attend_reference(*(x.astype(jnp.float32)
                                          for x in (q, k, v)), None)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=3e-2, atol=3e-2)
  _, grads = _value_and_grads(attention_core.attend, q, k, v, g, None)
  _, ref_grads = _value_and_grads(
      attention_core.attend_reference,
      *(x.astype(jnp.float32) for x in (q, k, v, g)), None)
  for a, b in zip(grads, ref_grads):
    assert a.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a.astype(jnp.float32), b, atol=3e-2 * scale)
