"""Optimizer pieces: global-norm clipping that reuses the step's norm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagen_jax import build
from imagen_jax import parallel
from imagen_jax.stage import Stage
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train.step import make_train_step
from tests import helpers


def _tree(scale):
  rs = np.random.RandomState(0)
  return {"a": jnp.asarray(rs.randn(3, 4) * scale, jnp.float32),
          "b": {"c": jnp.asarray(rs.randn(5) * scale, jnp.float32)}}


@pytest.mark.parametrize("scale", [0.01, 10.0])   # below / above the threshold
def test_clip_matches_optax_with_and_without_a_given_norm(scale):
  g = _tree(scale)
  ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  ours = optim.clip_by_global_norm(1.0)
  state = ours.init(g)
  computed, _ = ours.update(g, state)
  given, _ = ours.update(g, state, grad_norm=optax.global_norm(g))
  for r, a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(computed),
                     jax.tree_util.tree_leaves(given)):
    np.testing.assert_array_equal(r, a)
    np.testing.assert_array_equal(r, b)
  # A wrong norm is used as given (proof that it is read, not recomputed).
  wrong, _ = ours.update(g, state, grad_norm=optax.global_norm(g) * 2 + 2)
  assert not np.allclose(jax.tree_util.tree_leaves(wrong)[0],
                         jax.tree_util.tree_leaves(ref)[0])


def test_train_step_equals_optax_clip_chain():
  """One clipped step with our chain == optax's clip + Adam, and one fewer norm."""
  config = helpers.tiny_train_config(**{"mesh.shape": (1, 1, 1),
                                        "mesh.num_devices": 1,
                                        "optimizer.grad_clip": 1e-3})
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  stage = Stage.from_config(config)
  rs = np.random.RandomState(0)
  batch = {"image": rs.randint(0, 255, (16, 16, 16, 3)).astype(np.uint8),
           "text": rs.randn(16, 16, 32).astype(np.float32),
           "text_mask": np.ones((16, 16), bool)}
  ours, lr = optim.make_optimizer(config.optimizer, 10)
  o = config.optimizer
  ref = optax.chain(optax.clip_by_global_norm(1e-3),
                    optax.adam(lr, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)))
  out, reductions = [], []
  for tx in (ours, ref):
    _, sh = state_lib.state_shardings(stage.unet, build.unet_inputs(config, 1, 4),
                                      tx, mesh)
    state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                                 jax.random.PRNGKey(0))
    step = make_train_step(stage, tx, lr, config, mesh, sh)
    state, m = step(state, batch)
    assert float(m["grad_norm"]) > 1e-3   # the clip is active
    out.append(jax.device_get(state.params))
    hlo = step.compiled(state, batch).as_text()
    reductions.append(hlo.count(" reduce(") + hlo.count(" reduce-window("))
  for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The reused norm removes one reduction per parameter leaf.
  assert reductions[0] <= reductions[1] - len(jax.tree_util.tree_leaves(out[0]))
