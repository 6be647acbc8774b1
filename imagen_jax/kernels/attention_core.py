"""Multi-head dot-product attention with a float32 softmax and a hand VJP.

``attend(q, k, v, mask)`` is ``softmax(q k^T / sqrt(H), masked) v``. The
forward pass never materialises the normalised weights: it keeps
``e = exp(logits - rowmax)`` and divides the ``[T, H]`` output by the row sums
instead of the ``[T, S]`` matrix. The backward pass uses the identity
``rowsum(P * dP) = rowsum(dO * O)`` (as FlashAttention does), an ``[T, H]``
product instead of another pass over ``[T, S]``:

    dV = e^T (dO / s),  dP' = (dO / s) V^T,  dS = e * (dP' - rowsum(dO * O) / s)
    dQ = dS K,  dK = dS^T Q

Autodiff of the plain formula makes four more passes over the ``[B, N, T, S]``
logits-sized arrays; on XLA:CPU the attention core of a 16x16 self-attention
layer ran faster this way (figures in benchmarks/RESULTS.md). The row
maximum is taken by halving the row with elementwise maxima: XLA:CPU's
max-reduce is much slower than its sum-reduce, the elementwise ``maximum``
loop is not.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# finfo.min, not -inf, for masked logits: a fully masked row then degrades to
# uniform weights instead of NaN, as in jax.nn.dot_product_attention.
_MASKED = float(jnp.finfo(jnp.float32).min)


def _row_max(x: jax.Array) -> jax.Array:
  """Max over the last axis (kept as size 1), by halving while it is even."""
  while x.shape[-1] > 8 and x.shape[-1] % 2 == 0:
    half = x.shape[-1] // 2
    x = jnp.maximum(x[..., :half], x[..., half:])
  return jnp.max(x, axis=-1, keepdims=True)


def _forward(q, k, v, mask):
  # q: [B, N, T, H] pre-scaled; k, v: [B, N, S, H]; mask: [B, S] or None
  logits = jnp.einsum("bnth,bnsh->bnts", q, k,
                      preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _MASKED)
  e = jnp.exp(logits - _row_max(logits))              # [B, N, T, S] f32
  s = jnp.sum(e, axis=-1, keepdims=True)              # [B, N, T, 1]
  o = jnp.einsum("bnts,bnsh->bnth", e.astype(v.dtype), v,
                 preferred_element_type=jnp.float32) / s
  return o.astype(v.dtype), e, s


@jax.custom_vjp
def _core(q, k, v, mask):
  return _forward(q, k, v, mask)[0]


def _core_fwd(q, k, v, mask):
  o, e, s = _forward(q, k, v, mask)
  return o, (q, k, v, mask, o, e, s)


def _core_bwd(res, do):
  q, k, v, mask, o, e, s = res
  dos = do.astype(jnp.float32) / s                     # [B, N, T, H]
  # rowsum(P * dP) = rowsum(dO * O); both sides over s -> D / s.
  d = jnp.sum(dos * o.astype(jnp.float32), axis=-1, keepdims=True)
  dv = jnp.einsum("bnts,bnth->bnsh", e.astype(v.dtype), dos.astype(v.dtype),
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("bnth,bnsh->bnts", dos.astype(v.dtype), v,
                  preferred_element_type=jnp.float32)
  ds = e * (dp - d)                                     # [B, N, T, S]
  if mask is not None:
    # The output does not depend on masked logits. In a fully masked row e
    # is 1 everywhere (uniform weights), and without this the row would
    # send gradient to q and k.
    ds = jnp.where(mask[:, None, None, :], ds, 0.0)
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("bnts,bnsh->bnth", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bnts,bnth->bnsh", ds, q, preferred_element_type=jnp.float32)
  dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dmask)


_core.defvjp(_core_fwd, _core_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: Optional[jax.Array]) -> jax.Array:
  """Multi-head dot-product attention with a float32 softmax.

  Args:
    q: ``[B, T, N, H]`` queries.
    k: ``[B, S, N, H]`` keys.
    v: ``[B, S, N, H]`` values.
    mask: ``[B, S]`` bool (True = attend) or None.

  Returns:
    ``[B, T, N, H]`` in the dtype of ``v``.
  """
  scale = q.shape[-1] ** -0.5
  # Heads-major layout for the batched matmuls: with the batch dims leading,
  # XLA:CPU runs them several times faster than the [B, T, N, H] einsum.
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, N, T|S, H]
  out = _core(q * jnp.asarray(scale, q.dtype), k, v, mask)
  return jnp.swapaxes(out, 1, 2)                         # [B, T, N, H]
