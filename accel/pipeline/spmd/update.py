"""Update phase: gradients averaged over 'data' (`pmean`), clipped by the global norm of all
stages' gradients if clip_norm > 0 (`accel.pipeline.clipping`), and each module applies its
own optimizer, only where it has a gradient (warm-up: module j's batch t-2(K-1)+j exists;
`jnp.where` keeps the old state otherwise). The optimizer runs per layer (vmap over the
stage's n layers: each counts its own updates) and per owned tensor (E, first, last),
each tensor with its own `stream` extra argument (`streams`) for an optimizer that draws
random bits per tensor (the 16-bit update's stochastic rounding, `accel.lowprec.optimizer`).
The remedies' corrections (`accel.pipeline.remedies`) act on the averaged gradients before
the norm; PipeMare's factors on the optimizer's updates, to which the Nesterov momentum
adds gamma (w - w^{t-1}) (`remedies.nesterov_update`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from accel.pipeline import clipping, remedies
from accel.pipeline.spmd.stage import Iteration, keep


@dataclasses.dataclass(frozen=True)
class Masks:
  """Which tensors have a gradient at iteration t on this stage."""
  layers: Any          # [n] bool
  loss: Any            # batch t-(K-1) exists (the loss, E's output side, 'last')
  owned: dict          # {'E', 'first', 'last'}: this stage holds it and it has a gradient

  @classmethod
  def pipelined(cls, layer_module_S, owns_S, num_modules: int, first_batch: int,
                it: Iteration) -> 'Masks':
    """Module j has a gradient once its batch t-2(K-1)+j >= first_batch (0, or N after a
    synchronous warm-up of N iterations: `accel.pipeline.remedies`)."""
    me, b0 = it.me, it.b0
    layers = b0 + layer_module_S[me] >= first_batch               # [n]
    loss = it.t >= num_modules - 1 + first_batch
    return cls(layers=layers, loss=loss,
               owned={'E': owns_S['E'][me] & loss, 'first': owns_S['first'][me] & (b0 >= first_batch),
                      'last': owns_S['last'][me] & loss})


@dataclasses.dataclass(frozen=True)
class Update:
  params: Any
  opt: Any
  grad_norm: Any       # global norm of the gradients applied, before clipping
  sq_norm: Any         # this stage's part of grad_norm^2 (a reduction of every gradient)
  loss_valid: Any      # whether batch t-(K-1) exists
  masks: Masks
  raw: Any             # the gradients after the pmean, before corrections and clipping


def streams(me, num_stages: int, layers_per_stage: int):
  """Each tensor's stream: layer i of stage s is s n + i; E, first and last follow all
  layers (E the same on both untied copies, which must stay equal)."""
  n, s = layers_per_stage, num_stages
  return {'layers': me * n + jnp.arange(n), 'E': s * n, 'first': s * n + 1, 'last': s * n + 2}


def update(tx, g, params, opt, owns_S, counts_E_S, clip_norm: float, it: Iteration,
           masks_fn, correct=None, factors=None, momentum=None) -> Update:
  """owns_S: {'E', 'first', 'last'} -> [S] bool, who holds the tensor; counts_E_S: which
  stage counts E's gradient in the norm (once, although untied keeps two copies);
  masks_fn() -> `Masks`; correct(g, masks) -> g with the remedies' corrections
  (`accel.pipeline.remedies`); factors: {'layers': [n], 'first': scalar} on the
  optimizer's updates (PipeMare), None: none; momentum: (prev, gammas), w^{t-1} of
  {'layers', 'first'} and their Nesterov gamma ({'layers': [n], 'first': scalar}), None:
  none."""
  me = it.me
  g = lax.pmean(g, 'data')
  masks = masks_fn()
  raw = g
  if correct is not None:
    g = correct(g, masks)
  layer_valid, valid = masks.layers, masks.owned
  # Global norm of what is applied at t: each tensor with a gradient, counted once.
  sq_layers_N = jax.vmap(lambda v: optax.tree.norm(v, squared=True))(g['layers'])
  sq_norm = jnp.sum(jnp.where(layer_valid, sq_layers_N, 0.0))
  for name, counted in (('E', counts_E_S[me] & masks.loss), ('first', valid['first']),
                        ('last', valid['last'])):
    sq_norm += jnp.where(counted, optax.tree.norm(g[name], squared=True), 0.0)
  grad_norm = jnp.sqrt(lax.psum(sq_norm, 'stage'))
  if clip_norm:
    g = clipping.clip(g, grad_norm, clip_norm)

  tx = optax.with_extra_args_support(tx)

  def apply(grads, o, p, stream, factor=None, prev=None, gamma=0.0):
    updates, o = tx.update(grads, o, p, stream=stream)
    return remedies.apply_update(p, updates, factor, prev, gamma), o

  factors = factors or {}
  prev, gammas = momentum or ({}, {})
  stream = streams(me, owns_S['E'].shape[0], jax.tree_util.tree_leaves(g['layers'])[0].shape[0])
  new_p, new_opt = {}, {}
  extra = {key: v['layers'] for key, v in (('factor', factors), ('prev', prev),
                                           ('gamma', gammas)) if 'layers' in v}
  lp, lo = jax.vmap(apply)(g['layers'], opt['layers'], params['layers'], stream['layers'],
                           **extra)
  new_p['layers'] = keep(layer_valid, lp, params['layers'])
  new_opt['layers'] = keep(layer_valid, lo, opt['layers'])
  for name in ('E', 'first', 'last'):
    np_, no = apply(g[name], opt[name], params[name], stream[name], factors.get(name),
                    prev.get(name), gammas.get(name, 0.0))
    new_p[name] = keep(valid[name], np_, params[name])
    new_opt[name] = keep(valid[name], no, opt[name])
  return Update(params=new_p, opt=new_opt, grad_norm=grad_norm, sq_norm=sq_norm,
                loss_valid=masks.loss, masks=masks, raw=raw)
