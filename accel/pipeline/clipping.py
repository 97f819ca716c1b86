"""Global-norm gradient clipping across the pipeline's modules (optimizer.clip_norm = c > 0).

At iteration t every module applies the gradient of its own delayed batch (module j:
batch t-2(K-1)+j; the tied table E: its output-side part, batch t-(K-1), plus its
input-side part, batch t-2(K-1)). Clipping treats all of them together as the gradient
g_t of iteration t, as optax.clip_by_global_norm treats one synchronous gradient:

  norm_t = sqrt( sum over every tensor with a gradient at t of sum(g^2) )
  g     <- g * min(1, c / norm_t)   (optax's form: g if norm_t < c, else g / norm_t * c)

So the gradients summed belong to different batches, and during the warm-up only the
modules that already have a gradient count. Each tensor counts once: E's summed gradient
once, although the untied layout keeps a copy of it on two stages. The SPMD program gets
norm_t^2 as a psum over 'stage' of per-stage sums of squares, taken after the gradients'
pmean over 'data'. The clip sits outside the per-module optimizers (their tx is built
without it, `accel.optim.build_optimizer(clip=False)`): inside the per-layer vmapped tx
it would clip each layer alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def clip(grads, norm, clip_norm: float):
  """Every gradient in `grads` scaled as optax.clip_by_global_norm(clip_norm) would, with
  the global norm `norm` given (it spans more than `grads`)."""
  return jax.tree_util.tree_map(
      lambda g: jnp.where(norm < clip_norm, g, g / norm * clip_norm), grads)
