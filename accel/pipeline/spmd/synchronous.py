"""The synchronous warm-up iteration (pipeline.sync_warmup_steps = N, `accel.pipeline.remedies`):
batch t through every module and back within the iteration, with w^t, every module then
applying its gradient (delay 0): the naive model-parallel schedule, forward-locked.

It is the pipelined step's own phases run in rounds, the weights fixed: K forward rounds
(round r: every stage runs its forwards on what it received, `forward`; module r's stage
keeps the residuals of that round, the tied ring's stage 0 its segment B's from round 0,
module 0, and its segment A's from round K-1, module K-1), the head on module K-1's output,
then K backward rounds (`backward.blocks_backward`; each layer keeps its gradient from the
round of its module, K-1-j). Every stage is busy every round, only one usefully: K
stage-times forward and K backward per iteration, the naive schedule's cost, and one set
of residuals per stage. The history, inboxes and ring are passed through untouched (the
pipeline starts from empty at N); the token ring, w^{t-1} (weight prediction) and each
layer's last gradient (error feedback) advance as in the pipelined step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from accel.pipeline.spmd import backward, corrections, ring
from accel.pipeline.spmd.forward import forward
from accel.pipeline.spmd.head import head
from accel.pipeline.spmd.stage import Iteration, Keys, Segments, advance_tokens, keep, perms
from accel.pipeline.spmd.state import stage_arrays
from accel.pipeline.spmd.update import Masks, update

_tmap = jax.tree_util.tree_map


def build(pipe):
  """The shard_mapped warm-up iteration of `pipe` (a `program.Pipeline`), same state."""
  lay, tx, mp, tables = pipe.layout, pipe.tx, pipe.model_pieces, pipe.tables
  k, n, a, tied = lay.num_modules, lay.layers_per_stage, tables.split, lay.tied_ring
  fwd_perm, bwd_perm = perms(lay)
  arrays = stage_arrays(tables)
  layer_module_S, module_a_S = arrays['layer_module'], arrays['module_a']
  owns_S, counts_E_S = arrays['owns'], arrays['counts_E']
  dropout_key = pipe._dropout_key   # pylint: disable=protected-access

  def local(state, batch):
    t = state['step']
    me = lax.axis_index('stage')
    sq = lambda tree: _tmap(lambda v: v[0], tree)
    ex = lambda tree: _tmap(lambda v: v[None], tree)
    p, opt = sq(state['params']), sq(state['opt'])
    p_local = _tmap(lambda v: lax.pcast(v, 'data', to='varying'), p)
    E, first, last = p_local['E'], p_local['first'], p_local['last']
    tokens, _, _ = advance_tokens(state['tokens'], batch, t, k)
    # Every module on batch t: b0 = t, no history slots.
    zero = jnp.zeros((), jnp.int32)
    it = Iteration(t=t, me=me, is_first=me == 0, is_last=me == tables.last_stage, b0=t,
                   slot_now=zero, slot_b=zero)
    seg = Segments.cut(p_local['layers'], p_local['layers'], None, a, n, module_a_S, it)
    key_a, key_b, key_emb = (dropout_key(t, seg.module_a), dropout_key(t, me),
                             dropout_key(t, 0))
    keys = Keys(a_now=key_a, a_bwd=key_a, b_now=key_b, b_bwd=key_b, emb_now=key_emb,
                emb_bwd=key_emb)

    # Forward rounds: module r runs in round r on the stage that holds it.
    inbox = jnp.zeros_like(state['act_in'][0])
    kept = None
    for r in range(k):
      fwd = forward(mp, tied, True, E, first, batch['inputs'], inbox, None, seg, keys, it)
      take = {'a': seg.module_a == r, 'b': me == r}
      if kept is None:
        kept = {'res': fwd.residuals, 'a_in': fwd.a_in, 'b_in': fwd.b_in, 'a_out': fwd.a_out}
      else:
        kept = {'res': {name: [jnp.where(take[name], new, old) for new, old in
                               zip(fwd.residuals[name], kept['res'][name])]
                        for name in fwd.residuals},
                'a_in': fwd.a_in, 'b_in': fwd.b_in,
                'a_out': jnp.where(take['a'], fwd.a_out, kept['a_out'])}
      inbox = lax.ppermute(fwd.send, 'stage', fwd_perm)
    loss, (g_E_out, g_last, g_head) = head(mp, E, last, kept['a_out'], batch['targets'],
                                           lambda: dropout_key(t, k - 1))
    vjp_a = ring.with_residuals(ring.block_vjp(mp, seg.layers_a, jnp.zeros_like(kept['a_in']),
                                               None, keys.a_bwd)[1], kept['res']['a'])
    vjp_b = None
    if tied:
      vjp_b = ring.with_residuals(ring.block_vjp(mp, seg.layers_b,
                                                 jnp.zeros_like(kept['b_in']), None,
                                                 keys.b_bwd, seg.first_b)[1],
                                  kept['res']['b'])
    # Backward rounds: module K-1-rho's stage back-propagates in round rho.
    grad_inbox = jnp.zeros_like(state['grad_in'][0])
    g_layers = None
    for rho in range(k):
      g_round, send, dx_emb = backward.blocks_backward(vjp_a, vjp_b, grad_inbox, g_head, it)
      active = k - 1 - layer_module_S[me] == rho                   # [n]
      g_layers = (_tmap(lambda v: jnp.where(active.reshape((n,) + (1,) * (v.ndim - 1)), v,
                                            0.0), g_round)
                  if g_layers is None else keep(active, g_round, g_layers))
      grad_inbox = lax.ppermute(send, 'stage', bwd_perm)
    g = backward.gradients(mp, tied, k, E, first, batch['inputs'], dx_emb, g_layers, g_E_out,
                           g_last, keys, it)
    all_valid = lambda: Masks(layers=jnp.ones((n,), bool), loss=jnp.asarray(True),
                              owned={name: owns_S[name][me] for name in owns_S})
    upd = update(tx, g, p, opt, owns_S, counts_E_S, pipe.clip_norm, it, all_valid)
    new_state = dict(state, step=t + 1, params=ex(upd.params), opt=ex(upd.opt), tokens=tokens)
    if 'prev_params' in state:
      new_state['prev_params'] = ex({'layers': p['layers'], 'first': p['first']})
    if 'prev_grad' in state:
      new_prev, new_has = corrections.next_prev_grad(sq(state['prev_grad']),
                                                     sq(state['has_prev']), upd.raw, upd.masks)
      new_state['prev_grad'], new_state['has_prev'] = ex(new_prev), ex(new_has)
    loss = lax.pmean(lax.psum(jnp.where(it.is_last, loss, 0.0), 'stage'), 'data')
    return new_state, {'loss': loss, 'loss_valid': upd.loss_valid, 'grad_norm': upd.grad_norm}

  specs = pipe.state_layout.specs()
  return jax.shard_map(local, mesh=pipe.mesh, in_specs=(specs, P('data')),
                       out_specs=(specs, P()))
