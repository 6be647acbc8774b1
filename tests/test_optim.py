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


def _one_device_setup(seed, **overrides):
  """(config, mesh, stage, batch of 16) for one-device tiny train steps."""
  config = helpers.tiny_train_config(**{"mesh.shape": (1, 1, 1),
                                        "mesh.num_devices": 1, **overrides})
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  rs = np.random.RandomState(seed)
  batch = {"image": rs.randint(0, 255, (16, 16, 16, 3)).astype(np.uint8),
           "text": rs.randn(16, 16, 32).astype(np.float32),
           "text_mask": np.ones((16, 16), bool)}
  return config, mesh, Stage.from_config(config), batch


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
  config, mesh, stage, batch = _one_device_setup(
      0, **{"optimizer.grad_clip": 1e-3})
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


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_learning_rate_schedule_closed_form(decay):
  """Linear warmup to the peak, then the decay, against the formulas."""
  config = helpers.tiny_train_config(**{
      "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 10,
      "optimizer.decay": decay, "optimizer.end_lr_factor": 0.1})
  lr = optim.learning_rate_schedule(config.optimizer, total_steps=110)
  peak, end = 2e-3, 2e-4

  def want(step):
    if step < 10:
      return peak * step / 10
    frac = min((step - 10) / 100, 1.0)
    if decay == "cosine":
      return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))
    if decay == "linear":
      return peak + (end - peak) * frac
    return peak

  for step in (0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 200):
    np.testing.assert_allclose(float(lr(step)), want(step), rtol=1e-5,
                               atol=1e-12, err_msg=f"step {step}")


def test_unknown_optimizer_and_decay_are_one_line_errors():
  config = helpers.tiny_train_config(**{"optimizer.decay": "step"})
  with pytest.raises(ValueError, match="Unknown optimizer.decay 'step'"):
    optim.make_optimizer(config.optimizer, 10)
  config = helpers.tiny_train_config(**{"optimizer.name": "lion"})
  with pytest.raises(ValueError, match="Unknown optimizer.name 'lion'"):
    optim.make_optimizer(config.optimizer, 10)


def test_gradient_accumulation_is_the_mean_of_micro_batch_gradients():
  """grad_accum=k: one update with the mean gradient of k interleaved
  micro-batches (rows j::k, each with randomness fold_in(step key, j)), loss
  the mean of theirs; and the step's compiled temp memory shrinks."""
  k = 4
  config, mesh, stage, batch = _one_device_setup(
      1, **{"optimizer.grad_accum": k})
  tx, lr = optim.make_optimizer(config.optimizer, 10)
  _, sh = state_lib.state_shardings(stage.unet, build.unet_inputs(config, 1, 4),
                                    tx, mesh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  params0 = jax.device_get(state.params)
  opt0 = jax.device_get(state.opt_state)

  # The reference, from the definition.
  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0)
  losses, grads = [], []
  for j in range(k):
    micro = {n: v[j::k] for n, v in batch.items()}
    (loss, _), g = jax.jit(jax.value_and_grad(
        lambda p, b, r: stage.loss(p, b, r, train=True), has_aux=True))(
            params0, micro, jax.random.fold_in(rng, j))
    losses.append(float(loss))
    grads.append(g)
  mean_grad = jax.tree_util.tree_map(lambda *g: sum(g) / k, *grads)
  updates, _ = tx.update(mean_grad, opt0, params0)
  want = optax.apply_updates(params0, updates)

  step = make_train_step(stage, tx, lr, config, mesh, sh)
  temp_accum = step.compiled(state, batch).memory_analysis().temp_size_in_bytes
  new_state, m = step(state, batch)
  np.testing.assert_allclose(float(m["loss"]), np.mean(losses), rtol=1e-5)
  # Per-noise-level losses cover every example of all micro-batches once,
  # and their count-weighted mean is the loss (equal micro-batch sizes).
  counts = np.array([float(m[f"count_t{i}"]) for i in range(4)])
  bucket = np.array([float(m[f"loss_t{i}"]) for i in range(4)])
  assert counts.sum() == 16 and (counts > 0).sum() >= 2, counts
  np.testing.assert_allclose((bucket * counts).sum() / 16, np.mean(losses),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["grad_norm"]),
                             float(optax.global_norm(mean_grad)), rtol=1e-4)
  for got, ref in zip(jax.tree_util.tree_leaves(jax.device_get(new_state.params)),
                      jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)

  # The point of accumulating: activations of B / k examples live at a time.
  one = helpers.tiny_train_config(**{"mesh.shape": (1, 1, 1),
                                     "mesh.num_devices": 1})
  full = make_train_step(stage, tx, lr, one, mesh, sh)
  state = state_lib.init_state(stage.unet, config, tx, mesh, sh,
                               jax.random.PRNGKey(0))
  temp_full = full.compiled(state, batch).memory_analysis().temp_size_in_bytes
  assert temp_accum < 0.6 * temp_full, (temp_accum, temp_full)
