"""Backend kernels behind one small interface, chosen by ``config.model.kernels``.

The model code (``imagen_jax.models``) calls four functions and nothing
backend-specific:

  bias_add(y, bias, activation=None)             act(y + bias)
  modulate(x, scale, shift)                      FiLM x * (1 + scale) + shift
  group_norm_act(x, scale, shift, *, num_groups, epsilon, activation, dtype)
                                                 act(GroupNorm(x) * scale + shift)
  attention(q, k, v, mask)                       masked softmax(q k^T / sqrt(H)) v

Implementations:

  reference  plain jnp and autodiff; jax.nn.dot_product_attention (XLA).
  xla_cpu    rewrites for XLA:CPU: channel sums, closed-form VJPs.
  cudnn      the reference with cuDNN's fused attention (NVIDIA GPUs).

``auto`` picks ``xla_cpu`` on CPU and ``reference`` elsewhere: a faster path
becomes the default on a backend only after a measurement there
(benchmarks/accelerator_run.sh runs the A/B). A Pallas implementation would
be one more module with these four functions and a line in ``_MODULES``.
"""

from __future__ import annotations

import importlib
import types

import jax

IMPLEMENTATIONS = ("reference", "xla_cpu", "cudnn")
CHOICES = ("auto",) + IMPLEMENTATIONS

_MODULES = {name: f"imagen_jax.kernels.{name}" for name in IMPLEMENTATIONS}


def resolve(name: str) -> str:
  """The implementation ``name`` stands for on the default backend.

  Args:
    name: one of ``CHOICES``.

  Returns:
    One of ``IMPLEMENTATIONS``.
  """
  if name not in CHOICES:
    raise ValueError(f"model.kernels={name!r}; use one of {', '.join(CHOICES)}.")
  if name == "auto":
    return "xla_cpu" if jax.default_backend() == "cpu" else "reference"
  return name


def get(name: str = "auto") -> types.ModuleType:
  """The kernel module for ``name`` (``auto`` resolved on the default backend).

  Args:
    name: one of ``CHOICES``.

  Returns:
    A module with ``bias_add``, ``modulate``, ``group_norm_act`` and
    ``attention``.
  """
  return importlib.import_module(_MODULES[resolve(name)])
