"""`Pipeline`: the SPMD Ouroboros program, one iteration per call, assembled from its phases.

    local view of the state (`state`) -> token ring, roles, slots, segments, keys (`stage`)
    -> forward (`forward`) -> activations sent on -> head (`head`) -> backward
    (`backward`) -> input-gradients sent back -> update (`update`) -> history written
    (`ring`) -> next state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import families, prediction
from accel.pipeline.layout import Layout
from accel.pipeline.spmd import backward, ring
from accel.pipeline.spmd.forward import forward
from accel.pipeline.spmd.head import head
from accel.pipeline.spmd.stage import Iteration, Keys, Segments, advance_tokens, keep
from accel.pipeline.spmd.state import StageTables, StateLayout
from accel.pipeline.spmd.update import update
from accel.pipeline import pieces

_tmap = jax.tree_util.tree_map


def make_mesh(data: int, stage: int, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'stage') mesh with Auto axes."""
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, stage), ('data', 'stage'), (auto, auto), devices=devices)


class Pipeline:
  """Ouroboros over `mesh` (mesh.shape['stage'] must equal layout.num_stages)."""

  def __init__(self, cfg, layout: Layout, tx: optax.GradientTransformation,
               backward_weights: str, mesh: jax.sharding.Mesh, rng=None,
               clip_norm: float = 0.0, weight_prediction: float = 0.0):
    """rng: the train rng the dropout keys derive from (needed if cfg.dropout_rate > 0);
    clip_norm: c of `accel.pipeline.clipping` (0: no clipping); tx must not clip;
    weight_prediction: s of `accel.pipeline.prediction` (0: off; 'stored' only)."""
    prediction.check(weight_prediction, backward_weights)
    if backward_weights not in ('stored', 'recompute'):
      raise ValueError(f'backward_weights={backward_weights!r}')
    if mesh.shape['stage'] != layout.num_stages:
      raise ValueError(f"mesh has {mesh.shape['stage']} stages, layout needs "
                       f'{layout.num_stages}')
    if cfg.dropout_rate and rng is None:
      raise ValueError('dropout_rate > 0 needs the rng its masks derive from')
    self.model_pieces = families.for_config(cfg)
    self.cfg = self.model_pieces.cfg
    self.layout, self.tx, self.mesh = layout, tx, mesh
    self.rng = rng if cfg.dropout_rate else None
    self.clip_norm = clip_norm
    self.weight_prediction = weight_prediction
    self.stored = backward_weights == 'stored'
    self.tables = StageTables.build(layout, weight_prediction)
    self.state_layout = StateLayout(self.model_pieces, layout, self.tables, tx, mesh,
                                    self.stored, weight_prediction, self._dropout_key)
    # The shard_mapped iteration, to be jitted here or inside a caller's jit.
    self.step_fn = self._build_step()
    self._step = jax.jit(self.step_fn, donate_argnums=0)

  def init(self, params, batch_size: int, seq_len: int):
    """Pipeline state for the model's `params`; batch_size is the global batch."""
    return self.state_layout.init(params, batch_size, seq_len)

  def model_params(self, state):
    """Stage-stacked params -> the model's params."""
    return self.state_layout.model_params(state)

  def shardings(self, state):
    return self.state_layout.shardings(state)

  def _dropout_key(self, batch, module):
    """Inside the shard_map: module's key for batch on this data shard (None: no dropout)."""
    return pieces.dropout_key(self.rng, batch, module, lax.axis_index('data'))

  def step(self, state, batch):
    """One iteration; batch = dict(inputs, targets) [B, L] int32, sharded over 'data'.

    Returns (state, metrics): metrics['loss'] is the loss of batch t-(K-1),
    metrics['loss_valid'] whether that batch exists (false while the pipeline fills) and
    metrics['grad_norm'] the global norm of the gradients applied, before clipping.
    """
    batch = jax.device_put(batch, NamedSharding(self.mesh, P('data')))
    return self._step(state, batch)

  def _build_step(self):
    lay, tx, mp, clip_norm, tables = (self.layout, self.tx, self.model_pieces,
                                      self.clip_norm, self.tables)
    k, s, r = lay.num_modules, lay.num_stages, tables.ring_slots
    n, a, tied, stored = lay.layers_per_stage, tables.split, lay.tied_ring, self.stored
    fwd_perm = [(i, (i + 1) % s) for i in range(s)] if tied else [(i, i + 1) for i in range(s - 1)]
    bwd_perm = [(i, (i - 1) % s) for i in range(s)] if tied else [(i, i - 1) for i in range(1, s)]
    layer_module_S = jnp.asarray(tables.layer_module)
    module_a_S = jnp.asarray(tables.module_a)
    owns_S = {name: jnp.asarray(v) for name, v in
              (('E', tables.owns_E), ('first', tables.owns_first), ('last', tables.owns_last))}
    counts_E_S = jnp.asarray(tables.counts_E)
    layer_steps_S = jnp.asarray(tables.layer_steps)
    dropout_key = self._dropout_key

    def local(state, batch):
      t = state['step']
      me = lax.axis_index('stage')
      # The local view: this stage's slice of every array.
      sq = lambda tree: _tmap(lambda v: v[0], tree)
      p, opt = sq(state['params']), sq(state['opt'])
      # Per-shard weights (varying over 'data'): each vjp below is then local to its data
      # shard (no implicit psum); the one pmean over 'data' follows.
      to_local = lambda tree: _tmap(lambda v: lax.pcast(v, 'data', to='varying'), tree)
      p_local = to_local(p)
      E, first, last = p_local['E'], p_local['first'], p_local['last']
      # The weights the forwards run with: w, or predicted (`accel.pipeline.prediction`).
      p_fwd = {'layers': p_local['layers'], 'first': first}
      if 'prev_params' in state:
        prev = sq(state['prev_params'])
        p_fwd = to_local({'layers': prediction.predict(p['layers'], prev['layers'],
                                                       layer_steps_S[me]),
                          'first': prediction.predict(p['first'], prev['first'],
                                                      tables.first_steps)})
      # 'stored': {'a', 'b'}: lists of residual rings [R, size]; 'recompute': [R, B, L, D]
      hist = sq(state['hist'])
      mem = state['mem'][0] if mp.has_memory else None         # [n, B, M, D]
      act_in, grad_in = state['act_in'][0], state['grad_in'][0]
      tokens, inputs_bwd, targets = advance_tokens(state['tokens'], batch, t, k)
      it = Iteration.at(t, me, k, r, tables.last_stage)
      if not stored:   # 'recompute': the delayed batch's stored input
        a_in_b_hist = lax.dynamic_index_in_dim(hist, it.slot_b, 0, False)
      # The memory the delayed batch read ('stored': in its residuals; mem is a template).
      mem_hist_b = (lax.dynamic_index_in_dim(state['hist_mem'][0], it.slot_b, 0, False)
                    if 'hist_mem' in state else mem)
      seg = Segments.cut(p_local['layers'], p_fwd['layers'], mem, a, n, module_a_S, it)
      keys = Keys.at(dropout_key, it, seg)

      fwd = forward(mp, tied, stored, E, p_fwd['first'], batch['inputs'], act_in, mem, seg,
                    keys, it)
      new_act = lax.ppermute(fwd.send, 'stage', fwd_perm)
      loss, (g_E_out, g_last, g_head) = head(
          mp, E, last, fwd.a_out, targets, lambda: dropout_key(t - (k - 1), k - 1))
      if stored:
        vjp_a, vjp_b = backward.stored_vjps(mp, tied, hist, fwd, seg, keys, it)
      else:
        vjp_a, vjp_b = backward.recomputed_vjps(mp, tied, E, first, inputs_bwd, a_in_b_hist,
                                                mem_hist_b, fwd, seg, keys, it, a, n)
      g_layers, send_grad, dx_emb = backward.blocks_backward(vjp_a, vjp_b, grad_in, g_head, it)
      new_grad = lax.ppermute(send_grad, 'stage', bwd_perm)
      g = backward.gradients(mp, tied, k, E, first, inputs_bwd, dx_emb, g_layers, g_E_out,
                             g_last, keys, it)
      upd = update(tx, g, p, opt, layer_module_S, owns_S, counts_E_S, k, clip_norm, it)

      if stored:
        # The backward reads slot_b inside its fusions; writing slot_now only after all of
        # them (slot_now = slot_b on stage 0 of the tied ring) lets XLA write the ring in
        # place instead of copying all of it to keep the old slot for those reads. Every
        # read feeds a gradient, all of which sq_norm reduces, or the input-gradient sent.
        slot_now = ring.after(it.slot_now, (upd.sq_norm, new_grad))
        new_hist = {seg_name: ring.write(rg, fwd.residuals[seg_name], slot_now)
                    for seg_name, rg in hist.items()}
      else:
        new_hist = lax.dynamic_update_index_in_dim(hist, fwd.a_in, it.slot_now, 0)
      ex = lambda tree: _tmap(lambda v: v[None], tree)
      new_state = {'step': t + 1, 'params': ex(upd.params), 'opt': ex(upd.opt),
                   'act_in': new_act[None], 'grad_in': new_grad[None],
                   'hist': ex(new_hist), 'tokens': tokens}
      if mp.has_memory:
        # A layer's memory advances only with a real batch (module j: batch t-j >= 0).
        new_state['mem'] = keep(t - layer_module_S[me] >= 0, fwd.new_mem, mem)[None]
      if 'prev_params' in state:
        new_state['prev_params'] = ex({'layers': p['layers'], 'first': p['first']})
      if 'hist_mem' in state:
        new_state['hist_mem'] = lax.dynamic_update_index_in_dim(
            state['hist_mem'][0], mem, it.slot_now, 0)[None]
      loss = lax.pmean(lax.psum(jnp.where(it.is_last, loss, 0.0), 'stage'), 'data')
      return new_state, {'loss': loss, 'loss_valid': upd.loss_valid,
                         'grad_norm': upd.grad_norm}

    specs = self.state_layout.specs()
    in_specs = (specs, P('data'))
    out_specs = (specs, P())
    return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
