"""The remedies' corrections of the stage's gradients inside the pipelined step
(`accel.pipeline.remedies`): DC-ASGD with the forward weights of each delayed batch (kept
in `hist_w` beside the history), error feedback with the gradient each layer applied last
(`prev_grad`), PipeMare's factor on each layer's update. All act on the gradients averaged
over 'data' and are the identity where the delay is 0 (the loss-side module's layers, E,
'last').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from accel.pipeline import remedies
from accel.pipeline.spmd.stage import Iteration, keep

_tmap = jax.tree_util.tree_map


def forward_weights_of_batch(hist_w, p, layer_module, num_modules: int, it: Iteration):
  """{'layers', 'first'}: the weights the stage's forward of its delayed batch ran with
  (slot slot_b of hist_w); the loss-side module's layers ran this iteration with p."""
  read = _tmap(lambda ring: lax.dynamic_index_in_dim(ring, it.slot_b, 0, False), hist_w)
  return {'layers': keep(layer_module == num_modules - 1, p['layers'], read['layers']),
          'first': read['first']}


def correct(g, p, *, w_fwd=None, lam=0.0, prev=None, has_prev=None, c=0.0,
            layer_delay=None, first_delay=0):
  """g + lam g g (p - w_fwd) + c d (g - prev) on the layers and 'first' (`remedies`);
  the feedback term only where the layer has applied a gradient before."""
  out = dict(g)
  for name, delay in (('layers', layer_delay), ('first', first_delay)):
    terms = []
    if lam:
      terms.append(remedies.compensation_term(g[name], p[name], w_fwd[name], lam))
    if c:
      cd = jnp.where(has_prev[name], c * jnp.asarray(delay, jnp.float32), 0.0)
      terms.append(remedies.feedback_term(g[name], prev[name], cd))
    if terms:
      out[name] = remedies.add(g[name], *terms)
  return out


def pipemare_factors(t, layer_delay, first_delay: int, steps: int, sync_warmup_steps: int):
  """PipeMare's factor on the updates of the stage's layers ([n]) and of 'first'."""
  return {'layers': remedies.pipemare_factor(t, layer_delay, steps, sync_warmup_steps),
          'first': remedies.pipemare_factor(t, first_delay, steps, sync_warmup_steps)}


def next_prev_grad(prev, has_prev, raw, masks):
  """The gradient each layer applied last, and whether it has one, after iteration t."""
  valid = {'layers': masks.layers, 'first': masks.owned['first']}
  new_prev = {name: keep(valid[name], raw[name], prev[name]) for name in prev}
  new_has = {name: has_prev[name] | valid[name] for name in has_prev}
  return new_prev, new_has
