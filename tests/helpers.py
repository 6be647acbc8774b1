"""Shared test utilities."""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="tiny"):
  """Loads ``configs/<name>.py`` and returns ``get_config(arg)``."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def perturb(params, seed, scale=0.05):
  """Adds host-side noise to every parameter so zero-init layers become live.

  numpy, not jax.random: XLA's CPU compile of a hundred threefry calls takes
  tens of seconds, and this is test scaffolding.
  """
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + scale * rs.standard_normal(p.shape)
                            .astype(np.float32)), params)


@functools.lru_cache(maxsize=None)
def _init_cached(stage, variant, batch, text_len, seed):
  config = load_config(stage, variant)
  module = build.build_unet(config.model)
  inputs = build.unet_inputs(config, batch, text_len)
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed),
                                         **inputs)["params"])
  return params


def init_unet(config_or_stage, batch=2, text_len=6, seed=0, live=True,
              variant="tiny"):
  """Builds a stage's U-Net and unboxed params (perturbed when ``live``).

  Args:
    config_or_stage: a stage name (configs/<name>.py, cached) or a config.
    batch, text_len: shapes of the example inputs returned.
    seed: init seed.
    live: perturb params so zero-initialised layers carry signal.
    variant: config variant when a name is given.

  Returns:
    (module, params, example inputs).
  """
  if isinstance(config_or_stage, str):
    config = load_config(config_or_stage, variant)
    params = _init_cached(config_or_stage, variant, 1, 4, seed)
  else:
    config = config_or_stage
    module = build.build_unet(config.model)
    params = nn.unbox(jax.jit(module.init)(
        jax.random.PRNGKey(seed), **build.unet_inputs(config, 1, 4))["params"])
  module = build.build_unet(config.model)
  inputs = build.unet_inputs(config, batch, text_len)
  if live:
    params = perturb(params, seed + 1)
  return module, params, inputs


def apply_fn(module):
  """A jitted ``(params, **inputs) -> output`` for a U-Net module."""
  return jax.jit(lambda params, **kw: module.apply({"params": params}, **kw))


def random_inputs(inputs, seed=0, valid_tokens=None):
  """Random values for the keys of ``inputs`` (text mask: prefix of valid)."""
  rs = np.random.RandomState(seed)
  out = dict(inputs)
  out["x"] = jnp.asarray(rs.standard_normal(inputs["x"].shape), jnp.float32)
  out["logsnr"] = jnp.asarray(rs.uniform(-5, 5, inputs["logsnr"].shape),
                              jnp.float32)
  out["text"] = jnp.asarray(rs.standard_normal(inputs["text"].shape),
                            jnp.float32)
  b, length = inputs["text_mask"].shape
  valid = valid_tokens if valid_tokens is not None else [length - i % length
                                                         for i in range(b)]
  out["text_mask"] = jnp.arange(length)[None, :] < jnp.asarray(valid)[:, None]
  if "lowres" in inputs:
    out["lowres"] = jnp.asarray(rs.uniform(-1, 1, inputs["lowres"].shape),
                                jnp.float32)
    out["aug_logsnr"] = jnp.asarray(rs.uniform(0, 5, (b,)), jnp.float32)
  return out


def tiny_train_config(**overrides):
  """configs/tiny.py with overrides given as dotted keys (a.b=value)."""
  spec = importlib.util.spec_from_file_location(
      "tiny", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return config


def read_scalars(workdir, tag="loss"):
  """{step: value} of a TensorBoard scalar in ``workdir`` (last write wins)."""
  import glob
  import tensorflow as tf
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          if v.HasField("tensor"):
            out[event.step] = float(tf.make_ndarray(v.tensor))
          else:
            out[event.step] = float(v.simple_value)
  return out


def run_cli(module, *args, env=None, timeout=600):
  """Runs ``python -m module args`` in the repo; returns CompletedProcess."""
  import subprocess
  import sys
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=full_env)
