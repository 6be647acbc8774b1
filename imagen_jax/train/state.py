"""The train state pytree, its shardings, and sharded initialisation.

Initialisation never materialises unsharded params: the state's shapes come
from ``jax.eval_shape``, shardings from the params' logical axis names, and
``jax.jit(init, out_shardings=...)`` creates every array in place.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from imagen_jax import build
from imagen_jax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params: float32 master params.
    opt_state: optimizer state.
    ema_params: exponential moving average of params (sampled from).
    skipped: consecutive steps skipped for non-finite loss/gradients.
    total_skipped: all skipped steps.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  skipped: jax.Array
  total_skipped: jax.Array


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay at ``step``: min(decay, (1 + step) / (10 + step)) with warmup.

  The warmup keeps early EMA params close to the (fast-moving) params instead
  of anchored at their random init.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _opt_state_shardings(abstract_opt, abstract_params, param_shardings,
                         mesh: Mesh):
  """Optimizer-state leaves shaped like a param get that param's sharding.

  optax states hold param-structured subtrees (Adam's mu and nu; Adafactor's
  factored rows and columns). A leaf whose dict-key path ends with a param's
  path and has its shape is sharded like that param; everything else (step
  counts, factored vectors) is replicated.
  """
  by_path = {}
  for (path, leaf), sh in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree_util.tree_leaves(param_shardings)):
    by_path[_dict_keys(path)] = (leaf.shape, sh)
  rep = parallel.replicated(mesh)

  def pick(path, leaf):
    keys = _dict_keys(path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(module: nn.Module, inputs: dict, tx: optax.GradientTransformation,
                    mesh: Mesh, rules=parallel.DEFAULT_RULES
                    ) -> tuple[TrainState, TrainState]:
  """(abstract state, its shardings) for a module and optimizer on a mesh."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inputs))
  param_sh = parallel.param_shardings(boxed, mesh, rules)["params"]
  abstract = jax.eval_shape(lambda: _init(module, inputs, tx,
                                          jax.random.PRNGKey(0)))
  rep = parallel.replicated(mesh)
  shardings = TrainState(
      step=rep, params=param_sh,
      opt_state=_opt_state_shardings(abstract.opt_state, abstract.params,
                                     param_sh, mesh),
      ema_params=param_sh, skipped=rep, total_skipped=rep)
  return abstract, shardings


def _init(module, inputs, tx, rng) -> TrainState:
  params = nn.unbox(module.init(rng, **inputs))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    skipped=jnp.zeros((), jnp.int32),
                    total_skipped=jnp.zeros((), jnp.int32))


def init_state(module: nn.Module, config, tx: optax.GradientTransformation,
               mesh: Mesh, shardings: TrainState, rng: jax.Array) -> TrainState:
  """Creates a fresh, sharded train state (no unsharded copy ever exists)."""
  inputs = build.unet_inputs(config, 1, 4)
  with mesh:
    return jax.jit(lambda r: _init(module, inputs, tx, r),
                   out_shardings=shardings)(rng)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: restore targets for orbax."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


@jax.jit
def is_finite_tree(tree: Any) -> jax.Array:
  """True when every float leaf of ``tree`` is finite (one compiled reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)

