"""Update phase: gradients averaged over 'data' (`pmean`), clipped by the global norm of all
stages' gradients if clip_norm > 0 (`accel.pipeline.clipping`), and each module applies its
own optimizer, only where it has a gradient (warm-up: module j's batch t-2(K-1)+j exists;
`jnp.where` keeps the old state otherwise). The optimizer runs per layer (vmap over the
stage's n layers: each counts its own updates) and per owned tensor (E, first, last).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from accel.pipeline import clipping
from accel.pipeline.spmd.stage import Iteration, keep


@dataclasses.dataclass(frozen=True)
class Update:
  params: Any
  opt: Any
  grad_norm: Any       # global norm of the gradients applied, before clipping
  sq_norm: Any         # this stage's part of grad_norm^2 (a reduction of every gradient)
  loss_valid: Any      # whether batch t-(K-1) exists


def update(tx, g, params, opt, layer_module_S, owns_S, counts_E_S, num_modules: int,
           clip_norm: float, it: Iteration) -> Update:
  """owns_S: {'E', 'first', 'last'} -> [S] bool, who holds the tensor; counts_E_S: which
  stage counts E's gradient in the norm (once, although untied keeps two copies)."""
  me, b0, k = it.me, it.b0, num_modules
  g = lax.pmean(g, 'data')
  # Which parts have a gradient at iteration t (module j: batch t-2(K-1)+j >= 0).
  layer_valid = b0 + layer_module_S[me] >= 0               # [n]
  loss_valid = it.t >= k - 1
  valid = {'E': owns_S['E'][me] & loss_valid, 'first': owns_S['first'][me] & (b0 >= 0),
           'last': owns_S['last'][me] & loss_valid}
  # Global norm of what is applied at t: each tensor with a gradient, counted once.
  sq_layers_N = jax.vmap(lambda v: optax.tree.norm(v, squared=True))(g['layers'])
  sq_norm = jnp.sum(jnp.where(layer_valid, sq_layers_N, 0.0))
  for name, counted in (('E', counts_E_S[me] & loss_valid), ('first', valid['first']),
                        ('last', valid['last'])):
    sq_norm += jnp.where(counted, optax.tree.norm(g[name], squared=True), 0.0)
  grad_norm = jnp.sqrt(lax.psum(sq_norm, 'stage'))
  if clip_norm:
    g = clipping.clip(g, grad_norm, clip_norm)

  def apply(grads, o, p):
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  new_p, new_opt = {}, {}
  lp, lo = jax.vmap(apply)(g['layers'], opt['layers'], params['layers'])
  new_p['layers'] = keep(layer_valid, lp, params['layers'])
  new_opt['layers'] = keep(layer_valid, lo, opt['layers'])
  for name in ('E', 'first', 'last'):
    np_, no = apply(g[name], opt[name], params[name])
    new_p[name] = keep(valid[name], np_, params[name])
    new_opt[name] = keep(valid[name], no, opt[name])
  return Update(params=new_p, opt=new_opt, grad_norm=grad_norm, sq_norm=sq_norm,
                loss_valid=loss_valid)
