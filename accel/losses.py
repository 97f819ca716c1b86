"""Losses shared by the tasks.

`cross_entropy(logits, labels)`: per-example softmax cross-entropy in float32 for logits of
any dtype, with a hand-written backward,

  loss_i = logsumexp(z_i) - z_i[y_i],     dloss_i/dz_i = softmax(z_i) - onehot(y_i),

that reads the (bf16) logits once and writes the gradient in the logits' dtype in one
elementwise pass. Autodiff of the float32 form materialises float32 copies of the
B x L x V logits and their gradient; for GPT-2 small (V = 50304) those passes were about 10 of
the 70 ms of a step on an H200 (experiments/trace_summary.py on a profile of bench_lm).

The forward is one pass over the logits too: logsumexp as max(z) + log(sum(exp(z - max(z))))
reads them twice (a max, then a sum), so it is computed instead as one reduction of pairs
(m, s), s = sum exp(z - m) at the running maximum m (the online softmax of Milakov and
Gimelshein 2018, arXiv 1805.02867):

  (m1, s1) + (m2, s2) = (M, s1 exp(m1 - M) + s2 exp(m2 - M)),   M = max(m1, m2),

one exponential per element. `cross_entropy_and_hits` carries the index of the maximum
through the same reduction (ties to the lowest index, as argmax), so top-1 accuracy costs no
further pass over the logits (the separate argmax was ~2% of the GPT-2 step,
results/bench_lm_gpu_profile.txt).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _combine(a, b):
  """(max, sum of exp below it[, index of the max]) of two partial reductions."""
  m1, s1, *i1 = a
  m2, s2, *i2 = b
  m = jnp.maximum(m1, m2)
  smaller = jnp.minimum(m1, m2)
  scale = jnp.where(m == -jnp.inf, 0.0, jnp.exp(smaller - m))  # (-inf) - (-inf) is nan
  first_larger = m1 >= m2
  s = jnp.where(first_larger, s1 + s2 * scale, s1 * scale + s2)
  if not i1:
    return m, s
  index = jnp.where(m1 > m2, i1[0], jnp.where(m2 > m1, i2[0], jnp.minimum(i1[0], i2[0])))
  return m, s, index


def softmax_stats(logits, with_argmax: bool = False):
  """logsumexp over the last axis in float32 in one pass (and argmax, if asked)."""
  z = logits.astype(jnp.float32)
  axis = z.ndim - 1
  operands = [z, jnp.ones_like(z)]
  inits = [jnp.array(-jnp.inf, jnp.float32), jnp.array(0.0, jnp.float32)]
  if with_argmax:
    operands.append(lax.broadcasted_iota(jnp.int32, z.shape, axis))
    inits.append(jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
  m, s, *index = lax.reduce(tuple(operands), tuple(inits), _combine, (axis,))
  return (m + jnp.log(s), *index)


def _forward(logits, labels, with_argmax):
  lse, *argmax = softmax_stats(logits, with_argmax)
  target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return lse - target.astype(jnp.float32), lse, argmax


@jax.custom_vjp
def cross_entropy(logits, labels):
  return _forward(logits, labels, False)[0]


@jax.custom_vjp
def cross_entropy_and_hits(logits, labels):
  """(per-example cross-entropy, argmax(logits) == labels), from one pass over the logits."""
  loss, _, (argmax,) = _forward(logits, labels, True)
  return loss, argmax == labels


def _fwd(logits, labels):
  loss, lse, _ = _forward(logits, labels, False)
  return loss, (logits, labels, lse)


def _fwd_hits(logits, labels):
  loss, lse, (argmax,) = _forward(logits, labels, True)
  return (loss, argmax == labels), (logits, labels, lse)


def _bwd(residuals, g):
  logits, labels, lse = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  dlogits = ((probs - onehot) * g[..., None]).astype(logits.dtype)
  return dlogits, None


cross_entropy.defvjp(_fwd, _bwd)
cross_entropy_and_hits.defvjp(_fwd_hits, lambda residuals, g: _bwd(residuals, g[0]))
