"""`Pipeline`: the SPMD Ouroboros program, one iteration per call, assembled from its phases.

    local view of the state (`state`) -> token ring, roles, slots, segments, keys (`stage`)
    -> forward (`forward`) -> activations sent on -> head (`head`) -> backward
    (`backward`) -> input-gradients sent back -> update (`update`) -> history written
    (`ring`) -> next state.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import families, hooks as method_hooks, prediction, remedies
from accel.pipeline.layout import Layout
from accel.pipeline.spmd import backward, corrections, ring, synchronous
from accel.pipeline.spmd.forward import forward
from accel.pipeline.spmd.head import head
from accel.pipeline.spmd.stage import Iteration, Keys, Segments, advance_tokens, keep, perms
from accel.pipeline.spmd.state import StageTables, StateLayout, stage_arrays
from accel.pipeline.spmd.update import Masks, update
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
               clip_norm: float = 0.0, weight_prediction: float = 0.0,
               sync_warmup_steps: int = 0, delay_compensation: float = 0.0,
               pipemare_steps: int = 0, error_feedback: float = 0.0,
               nesterov_momentum: float = 0.0,
               hooks: method_hooks.MethodHooks = method_hooks.NONE):
    """rng: the train rng the dropout keys derive from (needed if cfg.dropout_rate > 0);
    clip_norm: c of `accel.pipeline.clipping` (0: no clipping); tx must not clip;
    weight_prediction: s of `accel.pipeline.prediction` (0: off; 'stored' only); the
    remedies N, lambda, T, c, gamma of `accel.pipeline.remedies` (0: off). With N > 0 iterations
    t < N run `sync_step_fn` (`synchronous`), the others `step_fn`. hooks: the enabled
    methods' (`accel.pipeline.hooks`); the blocks see the 'data' shard."""
    prediction.check(weight_prediction, backward_weights)
    if backward_weights not in ('stored', 'recompute'):
      raise ValueError(f'backward_weights={backward_weights!r}')
    if mesh.shape['stage'] != layout.num_stages:
      raise ValueError(f"mesh has {mesh.shape['stage']} stages, layout needs "
                       f'{layout.num_stages}')
    if cfg.dropout_rate and rng is None:
      raise ValueError('dropout_rate > 0 needs the rng its masks derive from')
    self.model_pieces = families.for_config(cfg, dataclasses.replace(hooks, data_axis='data'))
    remedies.check(backward_weights, self.model_pieces.has_memory,
                   sync_warmup_steps=sync_warmup_steps, delay_compensation=delay_compensation,
                   pipemare_steps=pipemare_steps, error_feedback=error_feedback,
                   nesterov_momentum=nesterov_momentum)
    self.sync_warmup_steps, self.delay_compensation = sync_warmup_steps, delay_compensation
    self.pipemare_steps, self.error_feedback = pipemare_steps, error_feedback
    self.nesterov_momentum = nesterov_momentum
    self.cfg = self.model_pieces.cfg
    self.layout, self.tx, self.mesh = layout, tx, mesh
    self.rng = rng if cfg.dropout_rate else None
    self.clip_norm = clip_norm
    self.weight_prediction = weight_prediction
    self.stored = backward_weights == 'stored'
    self.tables = StageTables.build(layout, weight_prediction, nesterov_momentum)
    self.state_layout = StateLayout(self.model_pieces, layout, self.tables, tx, mesh,
                                    self.stored, bool(weight_prediction or nesterov_momentum),
                                    self._dropout_key,
                                    delay_compensation, error_feedback)
    # The shard_mapped iteration, to be jitted here or inside a caller's jit.
    self.step_fn = self._build_step()
    self._step = jax.jit(self.step_fn, donate_argnums=0)
    self.sync_step_fn = self._step_sync = None
    if sync_warmup_steps:
      self.sync_step_fn = synchronous.build(self)
      self._step_sync = jax.jit(self.sync_step_fn, donate_argnums=0)

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

  def step(self, state, batch, t: int | None = None):
    """One iteration; batch = dict(inputs, targets) [B, L] int32, sharded over 'data'.
    t: the iteration's index, which picks the warm-up's program for t < N (None: read
    from the state, a wait for the device, only with a warm-up).

    Returns (state, metrics): metrics['loss'] is the loss of batch t-(K-1) (warm-up: of
    batch t), metrics['loss_valid'] whether that batch exists (false while the pipeline
    fills) and metrics['grad_norm'] the global norm of the gradients applied, before
    clipping.
    """
    batch = jax.device_put(batch, NamedSharding(self.mesh, P('data')))
    if self.sync_warmup_steps:
      t = int(state['step']) if t is None else t
      if t < self.sync_warmup_steps:
        return self._step_sync(state, batch)
    return self._step(state, batch)

  def _build_step(self):
    lay, tx, mp, clip_norm, tables = (self.layout, self.tx, self.model_pieces,
                                      self.clip_norm, self.tables)
    k, r = lay.num_modules, tables.ring_slots
    n, a, tied, stored = lay.layers_per_stage, tables.split, lay.tied_ring, self.stored
    fwd_perm, bwd_perm = perms(lay)
    arrays = stage_arrays(tables)
    layer_module_S, module_a_S = arrays['layer_module'], arrays['module_a']
    owns_S, counts_E_S = arrays['owns'], arrays['counts_E']
    layer_steps_S, layer_delay_S = arrays['layer_steps'], arrays['layer_delay']
    layer_momentum_S = arrays['layer_momentum']
    dropout_key = self._dropout_key
    first_batch, lam, c = self.sync_warmup_steps, self.delay_compensation, self.error_feedback

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
      # The weights the forwards run with: w, or extrapolated along the last update (weight
      # prediction, `accel.pipeline.prediction`; the Nesterov look-ahead, `remedies`).
      p_fwd = {'layers': p_local['layers'], 'first': first}
      fwd_weights = {'layers': p['layers'], 'first': p['first']}   # as stored for DC-ASGD
      if 'prev_params' in state:
        prev = sq(state['prev_params'])
        fwd_weights = {'layers': prediction.predict(p['layers'], prev['layers'],
                                                    layer_steps_S[me]),
                       'first': prediction.predict(p['first'], prev['first'],
                                                   tables.first_steps)}
        p_fwd = to_local(fwd_weights)
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
                             g_last, keys, it, first_batch)
      correct = factors = None
      if lam or c:
        w_fwd = (corrections.forward_weights_of_batch(sq(state['hist_w']), p, layer_module_S[me],
                                                      k, it) if lam else None)
        prev_g = sq(state['prev_grad']) if c else None
        has_prev = sq(state['has_prev']) if c else None
        correct = lambda g_, masks: corrections.correct(
            g_, p, w_fwd=w_fwd, lam=lam, prev=prev_g, has_prev=has_prev, c=c,
            layer_delay=layer_delay_S[me], first_delay=tables.first_delay)
      if self.pipemare_steps:
        factors = corrections.pipemare_factors(t, layer_delay_S[me], tables.first_delay,
                                               self.pipemare_steps, first_batch)
      momentum = None
      if self.nesterov_momentum:
        momentum = (sq(state['prev_params']), {'layers': layer_momentum_S[me],
                                               'first': tables.first_momentum})
      upd = update(tx, g, p, opt, owns_S, counts_E_S, clip_norm, it,
                   lambda: Masks.pipelined(layer_module_S, owns_S, k, first_batch, it),
                   correct, factors, momentum)

      if stored:
        # The backward reads slot_b inside its fusions; writing slot_now only after all of
        # them (slot_now = slot_b on stage 0 of the tied ring) lets XLA write the ring in
        # place instead of copying all of it to keep the old slot for those reads. Every
        # read feeds a gradient, all of which sq_norm reduces, or the input-gradient sent.
        slot_now = ring.after(it.slot_now, (upd.sq_norm, new_grad))
        new_hist = {seg_name: ring.write(rg, fwd.residuals[seg_name], slot_now)
                    for seg_name, rg in hist.items()}
        if lam:   # the forward weights of this iteration's batch, beside its residuals,
          # written after the compensation read them (it feeds sq_norm): in place
          slot_w = ring.after(it.slot_now, upd.sq_norm)
          hist_w = _tmap(lambda rg, v: lax.dynamic_update_index_in_dim(rg, v, slot_w, 0),
                         sq(state['hist_w']), fwd_weights)
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
      if lam:
        new_state['hist_w'] = ex(hist_w)
      if c:
        new_prev, new_has = corrections.next_prev_grad(prev_g, has_prev, upd.raw, upd.masks)
        new_state['prev_grad'], new_state['has_prev'] = ex(new_prev), ex(new_has)
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
