"""The jitted, donated train step: loss, gradients, update, EMA, NaN guard."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from imagen_jax import parallel
from imagen_jax.stage import Stage
from imagen_jax.train.state import TrainState, ema_decay


def _microbatch(batch: dict, k: int, j) -> dict:
  """The j-th of k interleaved micro-batches.

  ``[B, ...] -> [B / k, k, ...][:, j]`` keeps each device's rows on that
  device when the batch is sharded in contiguous blocks (no communication).
  """
  return jax.tree_util.tree_map(
      lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:])[:, j], batch)


def make_train_step(stage: Stage, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, config, mesh: Mesh,
                    state_shardings: TrainState) -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)``, jitted and donated.

  Per-step randomness is ``fold_in(PRNGKey(seed), step)``: a resumed run
  draws exactly what an uninterrupted one would. A step whose loss or
  gradients are not finite is skipped: params, optimizer state and EMA are
  returned bitwise unchanged and the skip counters increase.

  Args:
    stage: the stage (owns the loss).
    tx: optimizer.
    lr_schedule: for logging the learning rate.
    config: experiment config (seed, grad_accum, ema, loss_buckets).
    mesh: device mesh.
    state_shardings: shardings of the train state.

  Returns:
    The jitted step function.
  """
  accum = int(config.optimizer.grad_accum)
  buckets = int(config.loss_buckets)
  base_key = jax.random.PRNGKey(int(config.seed))
  decay, warmup = float(config.ema.decay), bool(config.ema.warmup)
  # Optimizers from optim.make_optimizer take the norm computed below
  # instead of computing it again for clipping.
  takes_norm = isinstance(tx, optax.GradientTransformationExtraArgs)

  def grads_of(params, batch, rng):
    def loss_fn(p, b, r):
      loss, aux = stage.loss(p, b, r, train=True)
      return loss, aux

    if accum == 1:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch, rng)
      return loss, aux, grads

    def body(carry, j):
      g_sum, l_sum = carry
      (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
          params, _microbatch(batch, accum, j), jax.random.fold_in(rng, j))
      return (jax.tree_util.tree_map(jnp.add, g_sum, g), l_sum + loss), aux

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (g_sum, l_sum), auxs = jax.lax.scan(body, (zeros, jnp.zeros(())),
                                        jnp.arange(accum))
    aux = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), auxs)
    return l_sum / accum, aux, jax.tree_util.tree_map(lambda g: g / accum, g_sum)

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(base_key, state.step)
    loss, aux, grads = grads_of(state.params, batch, rng)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    d = ema_decay(state.step, decay, warmup)

    def apply_update(args):
      params, opt_state, ema, grads = args
      extra = {"grad_norm": grad_norm} if takes_norm else {}
      updates, new_opt = tx.update(grads, opt_state, params, **extra)
      new_params = optax.apply_updates(params, updates)
      new_ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p,
                                       ema, new_params)
      return new_params, new_opt, new_ema

    def keep(args):
      return args[0], args[1], args[2]

    # A conditional, not jnp.where(ok, new, old) per leaf: the skip branch
    # hands the donated buffers straight back, while a select makes XLA copy
    # every optimizer-state leaf each step (old and new both live), which
    # costs a state's worth of temp memory and ~700 small copies a step on a
    # small U-Net. (XLA:GPU reads a conditional's predicate on the host, one
    # sync per step; the loop reads the skip counter every step anyway.)
    params, opt_state, ema_params = jax.lax.cond(
        ok, apply_update, keep,
        (state.params, state.opt_state, state.ema_params, grads))
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=ema_params,
        skipped=jnp.where(ok, 0, state.skipped + 1),
        total_skipped=state.total_skipped + (~ok).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": lr_schedule(state.step),
               "skipped": (~ok).astype(jnp.int32)}
    # Loss per noise level: t in [i / n, (i + 1) / n).
    idx = jnp.minimum((aux["t"] * buckets).astype(jnp.int32), buckets - 1)
    for i in range(buckets):
      sel = (idx == i).astype(jnp.float32)
      metrics[f"loss_t{i}"] = jnp.sum(aux["loss"] * sel) / jnp.maximum(sel.sum(), 1)
      metrics[f"count_t{i}"] = sel.sum()
    return new_state, metrics

  rep = parallel.replicated(mesh)
  lowered = {}
  compiled = {}

  def _key(batch):
    return tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))

  def lowered_for(state, batch):
    """The lowered (global, not yet partitioned) step for this signature."""
    key = _key(batch)
    if key not in lowered:
      batch_sh = {k: parallel.batch_sharding(mesh, v.ndim)
                  for k, v in batch.items()}
      with parallel.sharding_context(mesh):
        lowered[key] = jax.jit(
            step, in_shardings=(state_shardings, batch_sh),
            out_shardings=(state_shardings, rep),
            donate_argnums=(0,)).lower(state, batch)
    return lowered[key]

  def compiled_for(state, batch):
    """The AOT-compiled step for this batch signature (compiled once)."""
    key = _key(batch)
    if key not in compiled:
      with parallel.sharding_context(mesh):
        compiled[key] = lowered_for(state, batch).compile()
    return compiled[key]

  def run(state: TrainState, batch: dict):
    return compiled_for(state, batch)(state, batch)

  # The compiled executable, for XLA's memory analysis; the lowered program,
  # for the step's FLOPs (metrics.step_flops says why not the compiled one).
  run.compiled = compiled_for
  run.lowered = lowered_for
  return run
