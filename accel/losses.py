"""Losses shared by the tasks.

`cross_entropy(logits, labels)`: per-example softmax cross-entropy in float32 for logits of
any dtype, with a hand-written backward,

  loss_i = logsumexp(z_i) - z_i[y_i],     dloss_i/dz_i = softmax(z_i) - onehot(y_i),

that reads the (bf16) logits once and writes the gradient in the logits' dtype in one
elementwise pass. Autodiff of the float32 form materialises float32 copies of the
B x L x V logits and their gradient; for GPT-2 small (V = 50304) those passes were about 10 of
the 70 ms of a step on an H200 (experiments/trace_summary.py on a profile of bench_lm).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy(logits, labels):
  return _forward(logits, labels)[0]


def _forward(logits, labels):
  logits32 = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits32, axis=-1)
  target = jnp.take_along_axis(logits32, labels[..., None], axis=-1)[..., 0]
  return lse - target, lse


def _fwd(logits, labels):
  loss, lse = _forward(logits, labels)
  return loss, (logits, labels, lse)


def _bwd(residuals, g):
  logits, labels, lse = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  dlogits = ((probs - onehot) * g[..., None]).astype(logits.dtype)
  return dlogits, None


cross_entropy.defvjp(_fwd, _bwd)
