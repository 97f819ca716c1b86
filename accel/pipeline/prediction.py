"""Weight prediction for the delayed modules (`pipeline.weight_prediction` = s).

SpecTrain (Chen et al. 2018, arXiv 1809.02839): a module whose gradient arrives d updates
late runs its forward with the weights extrapolated along its last update,

  w_hat_j = w_j^t + s * d_j * (w_j^t - w_j^{t-1}),   d_j = 2(K-1-j) (`Layout.delay`),

so the weights the gradient was computed at are closer to the ones it is applied to
(PipeMare's discrepancy correction is related). With 'stored' the delayed backward is
the exact gradient of that forward (taken at w_hat_j) and is applied to w_j. The loss-side
module (d = 0) and the tied table E (shared by module 0 and the loss-side module) run
unpredicted. s = 0: off, no state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from accel.errors import UserError


def check(scale: float, backward_weights: str):
  if scale < 0:
    raise UserError(f'pipeline.weight_prediction must be >= 0, got {scale}')
  if scale and backward_weights != 'stored':
    raise UserError("pipeline.weight_prediction > 0 needs pipeline.backward_weights='stored'")


def predict(w, w_prev, steps):
  """w + steps * (w - w_prev), leaf by leaf; steps = s * d: a scalar, or one value per
  index of the leaves' leading axis (the layers of a stack, each its own module's d)."""
  steps = jnp.asarray(steps, jnp.float32)

  def one(a, b):
    c = steps.reshape(steps.shape + (1,) * (a.ndim - steps.ndim)).astype(a.dtype)
    return a + c * (a - b)
  return jax.tree_util.tree_map(one, w, w_prev)
