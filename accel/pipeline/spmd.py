"""The Ouroboros pipeline as one jitted SPMD program over a ('data', 'stage') mesh.

One call of `Pipeline.step` is one iteration t of the algorithm in `accel.pipeline`'s
docstring, for every stage at once, inside `jax.shard_map`:

  1. every stage runs the same ops, with no conditional: its local stack of n blocks is
     cut into segments A = layers[:a] and B = layers[a:], and the roles differ only in
     values selected by `jnp.where` on masks of lax.axis_index('stage'). (A `lax.switch`
     on the stage index made XLA:GPU copy the branch index to the host and block the
     host's launch thread until the GPU reached it, every step: results/
     pipeline_gpu_profile.md.)
       Tied ring (S = K-1, a = n_last): stage 0's A is module K-1 (input: the activation
       received, batch t-(K-1); loss and backward in the same iteration, delay 0), its
       B module 0 (input: the embedding of batch t; backward delayed 2(K-1)); stage
       s >= 1 runs module s as A then B on batch t-s (backward delayed 2(K-1-s)).
       Untied (S = K, a = n, B empty): A is module s; stage 0's input is the embedding,
       stage K-1's A is the fresh one (loss, delay 0), the others are delayed.
     Forward: a_out = A(a_in), b_out = B(where(stage 0, embed(batch t), a_out)), sent on.
     The head (LN_f, logits, loss and its gradient) runs on a_out on every stage and is
     used on the loss stage only: for a byte vocabulary negligible, for a large vocabulary
     an extra V x D matmul (forward and backward) on every other stage. Likewise every
     stage embeds (and, with Features Replay, re-embeds) and back-propagates the
     embedding, used on stage 0 only.
     Backward: dx_B = B's delayed vjp (the history), g_A = where(loss stage, head
     gradient, dx_B) (untied: the received gradient), dx_A = A's vjp, fresh from this
     iteration's forward on the loss stage, delayed from the history elsewhere, sent back;
     the embedding's backward takes stage 0's dx_B (untied: dx_A).
  2. `lax.ppermute` sends the forward outputs to the next stage and the input-gradients
     to the previous one (ring S-1 -> 0 in the tied layout); they arrive as next
     iteration's inboxes;
  3. gradients are averaged over 'data' (`pmean`), clipped by the global norm of all
     stages' gradients if clip_norm > 0 (`accel.pipeline.clipping`), and each module
     applies its own Adam, only where it has a gradient (warm-up; `jnp.where` keeps the
     old state otherwise).

Dropout: module j's forward of batch b, and its backward of b (re-run or rebuilt from the
stored residuals: the masks are re-derived from the key), use the key
`pieces.dropout_key(rng, b, j, lax.axis_index('data'))` (block i of the module:
`pieces.layer_key` of it and i, so segment B, which starts at block a of its module,
draws what one call over the whole module draws): each data shard draws its own masks, so
the masks depend on the mesh; with a data axis of 1 they are the reference's.

State, every array with a leading stage axis S (sharded over 'stage'; the batch axes over
'data'):
  params   layers [S, n, ...] (stage-major stack, `Layout`), E [S, V, D], first / last
           (module 0's / module K-1's own parameters, `families`: the position table;
           the final LN and Transformer-XL's output bias) [S, ...]; E / first / last are
           zeros on stages that do not own them.
  opt      optimizer state per layer (vmap over n: each layer counts its own updates,
           which equals per-module Adam since Adam is elementwise) and per owned tensor.
  act_in, grad_in   [S, B, L, D]: the messages received at the end of the last iteration.
  hist     [S, R, ...], R = 2(K-1): ring over the batches of the stage's delayed module
           (module s on stage s; the untied last stage writes entries it never reads),
           slot b mod R for batch b; module j writes batch t-j and reads batch t-2(K-1)+j,
           d_j = 2(K-1-j) <= R iterations apart (stage 0, d_0 = R: the same slot, read
           from the incoming state before it is written). What a slot holds:
           'recompute': A's input a_in [B, L, D] (module 0: none needed, it re-embeds its
             tokens; B re-runs on A's re-run output);
           'stored': the residuals of A's and of B's jax.vjp as their forward ran (the
             Dense outputs, the block inputs and the weights, `_block_vjp`; tied stage 0
             stores A's too, unread): hist = {'a': [...], 'b': [...] (tied ring)}, one
             ring [S, R, data * size] per residual, each data shard its own, in the
             residual's dtype (`_ring_dtype`: 16-bit floats as the unsigned integers of
             their bits). The backward rebuilds the vjp from them: no second pass
             through the Dense layers. The dropout key, the one residual not stored, is
             derived again. The backward reads its slot inside its own fusions; the slot
             is written after the backward (`_after`), so XLA updates the ring in place
             (written before, it would copy every ring to keep the slot being read).
  tokens   inputs/targets [2K-1, B, L], replicated over 'stage': module 0 re-embeds batch
           t-2(K-1) ('recompute') and module K-1 reads the targets of batch t-(K-1).
  mem      (models with a recurrence memory) [S, n, B, M, D]: each stage the memory of
           its own layers, advanced by each module's forward of a real batch (t - j >= 0).
  hist_mem ('recompute' with a memory) [S, R, n, B, M, D]: the stage memory at the
           forward of the batch in slot b mod R, i.e. what its delayed re-run must read.
  prev_params  (weight prediction s > 0, `accel.pipeline.prediction`) layers [S, n, ...]
           and first [S, ...]: w^{t-1}, the params before the last update. The forwards
           run with w + s d (w - w^{t-1}), d per layer from its module (`_layer_steps`,
           0 for module K-1's layers), first with d_0 = 2(K-1); E, last and the
           backward's templates use w, as does the embedding's backward (linear in E and
           first: its gradient does not depend on them).
Memory beyond the weights, per stage: 2 B L D inboxes plus R B L D history ('recompute',
and one extra forward per backward) or R residual sets ('stored': about 11 B L D per
block plus the stage's weights); with a recurrence memory also n B M D live memory and,
for 'recompute', R n B M D of memory history (in 'stored' it is in the residual sets); with
weight prediction one more copy of the stage's weights (prev_params).

All of this is plain static-shape state: checkpointing it checkpoints the pipeline.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import clipping, families, pieces, prediction
from accel.pipeline.layout import Layout

_tmap = jax.tree_util.tree_map


def make_mesh(data: int, stage: int, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'stage') mesh with Auto axes."""
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, stage), ('data', 'stage'), (auto, auto), devices=devices)


def _block_vjp(mp, layers, x, mem, key=None, first_layer=0):
  """jax.vjp (in layers and x; has_aux: the new memory) of a run of a module's blocks
  (`families`: blocks from first_layer on) whose residuals are the Dense outputs (and the
  inputs, the memory read, the weights and the dropout key): the attention scores, dropout
  masks and elementwise intermediates are re-derived from them in the backward,
  deterministically, so the backward is still that of the forward as it ran.
  Returns (y, vjp, new_mem).
  """
  blocks = jax.checkpoint(mp.blocks,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return jax.vjp(lambda l, x_: blocks(l, x_, mem, key, first_layer), layers, x, has_aux=True)


def _slice_mem(mem, start: int, stop: int):
  """The recurrence memory [n, B, M, D] of the stage's layers start..stop-1 (None: none)."""
  return None if mem is None else mem[start:stop]


def _is_key(a) -> bool:
  return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _residuals(vjp):
  """The residuals of a jax.vjp that the history stores: all its leaves but the dropout key."""
  return [a for a in jax.tree_util.tree_leaves(vjp) if not _is_key(a)]


def _with_residuals(template, residuals):
  """A vjp with `template`'s structure whose residuals are `residuals` (`_residuals` order).

  The template is a fresh jax.vjp of the same function on arrays of the same shapes; only
  its structure is used, so XLA drops the forward it traced. Its dropout key is kept: the
  template is built with the key of the batch being back-propagated, which is the key
  its forward ran with (`pieces.dropout_key` of batch and module).
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  stored = iter(residuals)
  return jax.tree_util.tree_unflatten(treedef, [a if _is_key(a) else next(stored)
                                                for a in leaves])


def _ring_dtype(dtype):
  """The dtype a residual of `dtype` is kept in: a float narrower than 32 bits as the
  unsigned integers of its bits (XLA:CPU writes into a bfloat16 array through float32,
  which copies the whole ring), any other as itself."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(f'uint{8 * dtype.itemsize}')
  return dtype


def _bitcast(v, dtype):
  return v if v.dtype == dtype else lax.bitcast_convert_type(v, dtype)


def _ring_read(ring, slot, like):
  """Slot `slot` of each local ring [R, size], as an array of the shape and dtype of the
  corresponding one of `like`."""
  return [_bitcast(lax.dynamic_index_in_dim(leaf, slot, 0, False), v.dtype).reshape(v.shape)
          for leaf, v in zip(ring, like)]


def _ring_write(ring, values, slot):
  """Each local ring [R, size] with its value (any shape of that size) written into `slot`."""
  return [lax.dynamic_update_index_in_dim(leaf, _bitcast(v, leaf.dtype).reshape(-1), slot, 0)
          for leaf, v in zip(ring, values)]


def _after(index, tree):
  """`index` (an integer scalar), made to depend on every leaf of `tree`.

  XLA orders ops by data dependence only (an optimization barrier is dropped before
  scheduling), so an op that must run after the ops computing `tree` takes this index.
  It reads one element x of each leaf (a leaf's producer must not be cheap enough for XLA
  to recompute that element alone: use reductions and collectives) and adds
  (x != x) & (x == x): 0 for every x, NaN included, but not foldable.
  """
  x = sum(v.ravel()[0].astype(jnp.float32) for v in jax.tree_util.tree_leaves(tree))
  return index + ((x != x) & (x == x)).astype(index.dtype)


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
    k, s, n = layout.num_modules, layout.num_stages, layout.layers_per_stage
    self._R = 2 * (k - 1)
    # Static per-stage tables: module of each local layer; owners of E / first / last.
    if layout.tied_ring:
      mods = [[k - 1] * layout.n_last + [0] * layout.n_first] + [[j] * n for j in range(1, s)]
    else:
      mods = [[j] * n for j in range(s)]
    self._layer_module = np.asarray(mods, np.int32)                      # [S, n]
    # Weight prediction: s * d of each local layer, d its module's delay; module 0's 'first'.
    self._layer_steps = (weight_prediction * np.vectorize(layout.delay)(self._layer_module)
                         ).astype(np.float32)
    self._first_steps = weight_prediction * layout.delay(0)
    self._last_stage = layout.stage_of(k - 1)
    self._owns_first = np.arange(s) == 0
    self._owns_last = np.arange(s) == self._last_stage
    self._owns_E = self._owns_first | self._owns_last
    self._counts_E = self._owns_last    # E's summed gradient enters the clip norm once
    # Segments (module docstring): A = layers[:a], B = layers[a:]; A's module per stage.
    self._a = layout.n_last if layout.tied_ring else n
    self._module_a = self._layer_module[:, 0]
    # The shard_mapped iteration, to be jitted here or inside a caller's jit.
    self.step_fn = self._build_step()
    self._step = jax.jit(self.step_fn, donate_argnums=0)

  # ----------------------------------------------------------------------------- layout
  def _stack(self, params):
    """Model params -> stage-stacked params (zeros where not owned)."""
    lay, s = self.layout, self.layout.num_stages
    parts = self.model_pieces.split(params)
    own = lambda mask, tree: _tmap(
        lambda a: jnp.stack([a if m else jnp.zeros_like(a) for m in mask]), tree)
    layers = _tmap(lambda a: jnp.roll(a, lay.roll, axis=0).reshape(s, lay.layers_per_stage,
                                                                   *a.shape[1:]),
                   parts['layers'])
    return {'layers': layers, 'E': own(self._owns_E, parts['E']),
            'first': own(self._owns_first, parts['first']),
            'last': own(self._owns_last, parts['last'])}

  def model_params(self, state):
    """Stage-stacked params -> the model's params."""
    p, lay = state['params'], self.layout
    layers = _tmap(lambda a: jnp.roll(a.reshape(lay.num_layers, *a.shape[2:]), -lay.roll, 0),
                   p['layers'])
    last = lay.stage_of(lay.num_modules - 1)
    return self.model_pieces.join(p['E'][0], _tmap(lambda a: a[0], p['first']), layers,
                                  _tmap(lambda a: a[last], p['last']))

  def _specs(self):
    st, dt = P('stage'), P('stage', 'data')
    specs = {'step': P(), 'params': st, 'opt': st, 'act_in': dt, 'grad_in': dt,
             'hist': P('stage', None, 'data'), 'tokens': P(None, 'data')}
    if self.model_pieces.has_memory:
      specs['mem'] = P('stage', None, 'data')
      if not self.stored:
        specs['hist_mem'] = P('stage', None, None, 'data')
    if self.weight_prediction:
      specs['prev_params'] = st
    return specs

  def init(self, params, batch_size: int, seq_len: int):
    """Pipeline state for the model's `params`; batch_size is the global batch."""
    cfg, s, r = self.cfg, self.layout.num_stages, self._R
    stacked = self._stack(params)
    init_layers = jax.vmap(jax.vmap(self.tx.init))
    init_owned = jax.vmap(self.tx.init, axis_size=s)   # axis_size: 'first' may be {}
    x = lambda: jnp.zeros((s, batch_size, seq_len, cfg.d_model), cfg.dtype)
    tok = lambda: jnp.zeros((2 * self.layout.num_modules - 1, batch_size, seq_len), jnp.int32)
    state = {'step': jnp.zeros((), jnp.int32), 'params': stacked,
             'opt': {'layers': init_layers(stacked['layers']), 'E': init_owned(stacked['E']),
                     'first': init_owned(stacked['first']), 'last': init_owned(stacked['last'])},
             'act_in': x(), 'grad_in': x(), 'tokens': {'inputs': tok(), 'targets': tok()}}
    if self.weight_prediction:   # w^{t-1}: before any update, w^0 (a copy: donated apart)
      state['prev_params'] = _tmap(jnp.copy, {'layers': stacked['layers'],
                                              'first': stacked['first']})
    mem = self.model_pieces.zero_memory(self.layout.layers_per_stage, batch_size)
    if mem is not None:    # [S, n, B, M, D]: each stage the memory of its own layers
      state['mem'] = jnp.stack([mem] * s)
    if self.stored:   # per segment, per residual: [S, R, data * size]
      data, ring = self.mesh.shape['data'], NamedSharding(self.mesh, self._specs()['hist'])
      state['hist'] = {seg: [jnp.zeros((s, r, data * v.size), _ring_dtype(v.dtype),
                                       device=ring) for v in leaves]
                       for seg, leaves in self._residual_shapes(stacked['layers'],
                                                                batch_size // data,
                                                                seq_len).items()}
    else:
      state['hist'] = jnp.zeros((s, r, batch_size, seq_len, cfg.d_model), cfg.dtype)
      if mem is not None:  # the memory each delayed batch read, for its re-run forward
        state['hist_mem'] = jnp.zeros((s, r, *mem.shape), mem.dtype)
    return jax.device_put(state, self.shardings(state))

  def _residual_shapes(self, layers_SxN, local_batch: int, seq_len: int):
    """{'a': [...], 'b': [...] (tied ring)}: shape and dtype of each residual of segment
    A's and of segment B's jax.vjp on one data shard (`_residuals`), what one history
    slot holds.

    Traced under the same shard_map as the step (weights varying over 'data', memory and
    keys over both axes, B's first block over 'stage'), because the residual list depends
    on it (a few scalar residuals appear there).
    """
    lay, cfg, mp, a = self.layout, self.cfg, self.model_pieces, self._a
    n, shapes = lay.layers_per_stage, {}

    def probe(layers, x):
      layers = _tmap(lambda v: lax.pcast(v[0], 'data', to='varying'), layers)
      me = lax.axis_index('stage')
      mem = _tmap(lambda v: lax.pcast(v, ('data', 'stage'), to='varying'),
                  mp.zero_memory(n, local_batch))
      key = self._dropout_key(me, me)
      segments = [('a', 0, a, 0)] + ([('b', a, n, jnp.where(me == 0, 0, a))]
                                     if lay.tied_ring else [])
      for seg, start, stop, first_layer in segments:
        vjp = _block_vjp(mp, pieces.slice_layers(layers, start, stop), x[0],
                         _slice_mem(mem, start, stop), key, first_layer)[1]
        shapes[seg] = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in _residuals(vjp)]
      return x

    data, s = self.mesh.shape['data'], lay.num_stages
    x = jax.ShapeDtypeStruct((s, data * local_batch, seq_len, cfg.d_model), cfg.dtype)
    jax.eval_shape(jax.shard_map(probe, mesh=self.mesh, in_specs=(P('stage'), P('stage', 'data')),
                                 out_specs=P('stage', 'data')), layers_SxN, x)
    return shapes

  def _dropout_key(self, batch, module):
    """Inside the shard_map: module's key for batch on this data shard (None: no dropout)."""
    return pieces.dropout_key(self.rng, batch, module, lax.axis_index('data'))

  def shardings(self, state):
    specs = self._specs()
    return {key: _tmap(lambda _: NamedSharding(self.mesh, specs[key]), v)
            for key, v in state.items()}

  def step(self, state, batch):
    """One iteration; batch = dict(inputs, targets) [B, L] int32, sharded over 'data'.

    Returns (state, metrics): metrics['loss'] is the loss of batch t-(K-1),
    metrics['loss_valid'] whether that batch exists (false while the pipeline fills) and
    metrics['grad_norm'] the global norm of the gradients applied, before clipping.
    """
    batch = jax.device_put(batch, NamedSharding(self.mesh, P('data')))
    return self._step(state, batch)

  # ------------------------------------------------------------------------- the step
  def _build_step(self):
    lay, tx, mp, clip_norm = self.layout, self.tx, self.model_pieces, self.clip_norm
    k, s, r = lay.num_modules, lay.num_stages, self._R
    n, a, tied, stored = lay.layers_per_stage, self._a, lay.tied_ring, self.stored
    rt = 2 * k - 1   # token ring: batches t-2(K-1) .. t

    def embed_vjp(E, first, tok, g, key):
      _, vjp = jax.vjp(lambda e, f: mp.embed(e, f, tok, key), E, first)
      return vjp(g)

    def keep(mask, new, old):
      """`new` where mask (a scalar, or one entry per leading index), else `old`."""
      return _tmap(lambda x, y: jnp.where(
          mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x, y), new, old)

    fwd_perm = [(i, (i + 1) % s) for i in range(s)] if tied else [(i, i + 1) for i in range(s - 1)]
    bwd_perm = [(i, (i - 1) % s) for i in range(s)] if tied else [(i, i - 1) for i in range(1, s)]
    layer_module = jnp.asarray(self._layer_module)
    module_a = jnp.asarray(self._module_a)
    owns = {name: jnp.asarray(v) for name, v in
            (('E', self._owns_E), ('first', self._owns_first), ('last', self._owns_last))}
    counts_E = jnp.asarray(self._counts_E)
    layer_steps = jnp.asarray(self._layer_steps)
    dropout_key = self._dropout_key

    def local(state, batch):
      t = state['step']
      me = lax.axis_index('stage')
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
                                                       layer_steps[me]),
                          'first': prediction.predict(p['first'], prev['first'],
                                                      self._first_steps)})
      # 'stored': {'a', 'b'}: lists of residual rings [R, size]; 'recompute': [R, B, L, D]
      hist = sq(state['hist'])
      mem = state['mem'][0] if mp.has_memory else None         # [n, B, M, D]
      act_in, grad_in = state['act_in'][0], state['grad_in'][0]
      # Token ring: write batch t, read batches t-(K-1) (targets) and t-2(K-1) (module 0).
      tokens = _tmap(lambda ring, new: lax.dynamic_update_index_in_dim(ring, new, t % rt, 0),
                     state['tokens'], batch)
      tok_b = lax.dynamic_index_in_dim(tokens['inputs'], (t + 1) % rt, 0, False)
      targets = lax.dynamic_index_in_dim(tokens['targets'], (t + k) % rt, 0, False)
      is_first, is_last = me == 0, me == self._last_stage
      b0 = t - 2 * (k - 1)           # the batch module 0 back-propagates
      # The stage's delayed module is module `me` (tied: segment B's, untied: A's);
      # history slot b mod R for its batch b.
      slot_now, slot_b = (t - me) % r, (b0 + me) % r
      if not stored:
        hist_b = lax.dynamic_index_in_dim(hist, slot_b, 0, False)
      # The memory the delayed batch read ('stored': in its residuals; mem is a template).
      mem_hist_b = (lax.dynamic_index_in_dim(state['hist_mem'][0], slot_b, 0, False)
                    if 'hist_mem' in state else mem)
      layers_a = pieces.slice_layers(p_local['layers'], 0, a)
      layers_b = pieces.slice_layers(p_local['layers'], a, n)
      layers_a_fwd = pieces.slice_layers(p_fwd['layers'], 0, a)
      layers_b_fwd = pieces.slice_layers(p_fwd['layers'], a, n)
      mem_a, mem_b = _slice_mem(mem, 0, a), _slice_mem(mem, a, n)
      mod_a = module_a[me]
      first_b = jnp.where(is_first, 0, a)     # B's first block within its module
      key_a_now, key_a_bwd = dropout_key(t - mod_a, mod_a), dropout_key(b0 + mod_a, mod_a)
      key_b_now, key_b_bwd = dropout_key(t - me, me), dropout_key(b0 + me, me)
      key_emb_now, key_emb_bwd = dropout_key(t, 0), dropout_key(b0, 0)

      # Forward: a_out = A(a_in); tied: b_out = B(where(stage 0, embed(batch t), a_out)).
      x_emb = mp.embed(E, p_fwd['first'], batch['inputs'], key_emb_now)
      a_in = act_in if tied else jnp.where(is_first, x_emb, act_in)
      if stored:
        a_out, vjp_a, new_mem_a = _block_vjp(mp, layers_a_fwd, a_in, mem_a, key_a_now)
        entry = {'a': _residuals(vjp_a)}
      else:
        a_out, new_mem_a = mp.blocks(layers_a, a_in, mem_a, key_a_now)
      if tied:
        b_in = jnp.where(is_first, x_emb, a_out)
        if stored:
          send_act, vjp_b, new_mem_b = _block_vjp(mp, layers_b_fwd, b_in, mem_b, key_b_now,
                                                  first_b)
          entry['b'] = _residuals(vjp_b)
        else:
          send_act, new_mem_b = mp.blocks(layers_b, b_in, mem_b, key_b_now, first_b)
        mem_fwd = None if mem is None else pieces.concat_layers([new_mem_a, new_mem_b])
      else:
        send_act, mem_fwd = a_out, new_mem_a
      new_act = lax.ppermute(send_act, 'stage', fwd_perm)

      # The head on every stage (the loss stage's A is module K-1; elsewhere masked out).
      loss, (g_E_out, g_last, g_head) = jax.value_and_grad(
          lambda e, l, h: mp.head_loss(e, l, h, targets, dropout_key(t - (k - 1), k - 1)),
          argnums=(0, 1, 2))(E, last, a_out)

      # Backward: B from the history (delayed), then A from the history or, on the loss
      # stage, from this iteration's forward (delay 0).
      if stored:
        hist_b = {seg: _ring_read(ring, slot_b, entry[seg]) for seg, ring in hist.items()}
        res_a = [jnp.where(is_last, now, old) for now, old in zip(entry['a'], hist_b['a'])]
        vjp_a_b = _with_residuals(
            _block_vjp(mp, layers_a, jnp.zeros_like(a_in), mem_a, key_a_bwd)[1], res_a)
        if tied:
          vjp_b_b = _with_residuals(_block_vjp(mp, layers_b, jnp.zeros_like(b_in), mem_b,
                                               key_b_bwd, first_b)[1], hist_b['b'])
      else:   # Features Replay: re-run the forward on the stored input with w^t
        x_emb_b = mp.embed(E, first, tok_b, key_emb_bwd)
        a_in_b = jnp.where(is_last, a_in, hist_b)
        if not tied:
          a_in_b = jnp.where(is_first, x_emb_b, a_in_b)
        a_re, vjp_a_b, _ = _block_vjp(mp, layers_a, a_in_b,
                                      keep(is_last, mem_a, _slice_mem(mem_hist_b, 0, a)),
                                      key_a_bwd)
        if tied:
          _, vjp_b_b, _ = _block_vjp(mp, layers_b, jnp.where(is_first, x_emb_b, a_re),
                                     _slice_mem(mem_hist_b, a, n), key_b_bwd, first_b)
      if tied:
        g_layers_b, dx_b = vjp_b_b(grad_in)
        g_layers_a, send_grad = vjp_a_b(jnp.where(is_last, g_head, dx_b))
        g_layers = pieces.concat_layers([g_layers_a, g_layers_b])
      else:
        g_layers, send_grad = vjp_a_b(jnp.where(is_last, g_head, grad_in))
      new_grad = lax.ppermute(send_grad, 'stage', bwd_perm)
      # Module 0's embedding backward (stage 0; batch b0 exists from t = 2(K-1) on).
      g_E_in, g_first = embed_vjp(E, first, tok_b, dx_b if tied else send_grad, key_emb_bwd)
      g_E = (jnp.where(is_last, g_E_out, 0.0)
             + jnp.where(is_first & (b0 >= 0), g_E_in, 0.0))
      g = {'layers': g_layers, 'E': g_E, 'first': g_first, 'last': g_last}
      if not tied:   # the two copies of E add each other's part
        g['E'] = g['E'] + lax.ppermute(g['E'], 'stage', [(0, k - 1), (k - 1, 0)])
      g = lax.pmean(g, 'data')
      # Which parts have a gradient at iteration t (module j: batch t-2(K-1)+j >= 0).
      layer_valid = b0 + layer_module[me] >= 0               # [n]
      loss_valid = t >= k - 1
      valid = {'E': owns['E'][me] & loss_valid, 'first': owns['first'][me] & (b0 >= 0),
               'last': owns['last'][me] & loss_valid}
      # Global norm of what is applied at t: each tensor with a gradient, counted once.
      sq_layers_N = jax.vmap(lambda v: optax.tree.norm(v, squared=True))(g['layers'])
      sq_norm = jnp.sum(jnp.where(layer_valid, sq_layers_N, 0.0))
      for name, counted in (('E', counts_E[me] & loss_valid), ('first', valid['first']),
                            ('last', valid['last'])):
        sq_norm += jnp.where(counted, optax.tree.norm(g[name], squared=True), 0.0)
      grad_norm = jnp.sqrt(lax.psum(sq_norm, 'stage'))
      if clip_norm:
        g = clipping.clip(g, grad_norm, clip_norm)

      def adam(grads, o, params):
        updates, o = tx.update(grads, o, params)
        return optax.apply_updates(params, updates), o

      new_p, new_opt = {}, {}
      lp, lo = jax.vmap(adam)(g['layers'], opt['layers'], p['layers'])
      new_p['layers'] = keep(layer_valid, lp, p['layers'])
      new_opt['layers'] = keep(layer_valid, lo, opt['layers'])
      for name in ('E', 'first', 'last'):
        np_, no = adam(g[name], opt[name], p[name])
        new_p[name] = keep(valid[name], np_, p[name])
        new_opt[name] = keep(valid[name], no, opt[name])
      if stored:
        # The backward reads slot_b inside its fusions; writing slot_now only after all of
        # them (slot_now = slot_b on stage 0 of the tied ring) lets XLA write the ring in
        # place instead of copying all of it to keep the old slot for those reads. Every
        # read feeds a gradient, all of which sq_norm reduces, or the input-gradient sent.
        slot_now = _after(slot_now, (sq_norm, new_grad))
        new_hist = {seg: _ring_write(ring, entry[seg], slot_now) for seg, ring in hist.items()}
      else:
        new_hist = lax.dynamic_update_index_in_dim(hist, a_in, slot_now, 0)
      ex = lambda tree: _tmap(lambda v: v[None], tree)
      new_state = {'step': t + 1, 'params': ex(new_p), 'opt': ex(new_opt),
                   'act_in': new_act[None], 'grad_in': new_grad[None],
                   'hist': ex(new_hist), 'tokens': tokens}
      if mp.has_memory:
        # A layer's memory advances only with a real batch (module j: batch t-j >= 0).
        new_state['mem'] = keep(t - layer_module[me] >= 0, mem_fwd, mem)[None]
      if 'prev_params' in state:
        new_state['prev_params'] = ex({'layers': p['layers'], 'first': p['first']})
      if 'hist_mem' in state:
        new_state['hist_mem'] = lax.dynamic_update_index_in_dim(
            state['hist_mem'][0], mem, slot_now, 0)[None]
      loss = lax.pmean(lax.psum(jnp.where(is_last, loss, 0.0), 'stage'), 'data')
      return new_state, {'loss': loss, 'loss_valid': loss_valid, 'grad_norm': grad_norm}

    specs = self._specs()
    in_specs = (specs, P('data'))
    out_specs = (specs, P())
    return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
