"""Head phase: LN_f, logits, loss and its gradient, on segment A's output.

It runs on every stage and is used on the loss stage only (the stage whose A is module
K-1): for a byte vocabulary negligible, for a large vocabulary an extra V x D matmul
(forward and backward) on every other stage.
"""
from __future__ import annotations

import jax


def head(mp, E, last, a_out, targets, key_fn):
  """(loss, (dloss/dE, dloss/dlast, dloss/da_out)); key_fn() the head's dropout key."""
  return jax.value_and_grad(
      lambda e, l, h: mp.head_loss(e, l, h, targets, key_fn()), argnums=(0, 1, 2))(
          E, last, a_out)
