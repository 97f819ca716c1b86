"""State layout of the SPMD program: every array with a leading stage axis S (sharded over
'stage'; the batch axes over 'data').

  params   layers [S, n, ...] (stage-major stack, `Layout`), E [S, V, D], first / last
           (module 0's / module K-1's own parameters, `families`: the position table;
           the final LN and Transformer-XL's output bias) [S, ...]; E / first / last are
           zeros on stages that do not own them.
  opt      optimizer state per layer (vmap over n: each layer counts its own updates,
           which equals per-module Adam since Adam is elementwise) and per owned tensor.
  act_in, grad_in   [S, B, L, D]: the messages received at the end of the last iteration.
  hist     [S, R, ...], R = 2(K-1): the history ring (`ring`).
  tokens   inputs/targets [2K-1, B, L], replicated over 'stage': module 0 re-embeds batch
           t-2(K-1) ('recompute') and module K-1 reads the targets of batch t-(K-1).
  mem      (models with a recurrence memory) [S, n, B, M, D]: each stage the memory of
           its own layers, advanced by each module's forward of a real batch (t - j >= 0).
  hist_mem ('recompute' with a memory) [S, R, n, B, M, D]: the stage memory at the
           forward of the batch in slot b mod R, i.e. what its delayed re-run must read.
  hist_w   (DC-ASGD, `accel.pipeline.remedies`) layers [S, R, n, ...], first [S, R, ...]: the
           forward weights of the batch in each slot of the history ring (as `hist`), what
           the delayed gradient's compensation subtracts.
  prev_grad, has_prev  (error feedback) layers [S, n, ...] / [S, n], first [S, ...] / [S]:
           the gradient each layer applied last, and whether it has applied one.
  prev_params  (weight prediction s > 0, `accel.pipeline.prediction`, or the Nesterov
           momentum gamma > 0, `accel.pipeline.remedies`) layers [S, n, ...] and first
           [S, ...]: w^{t-1}, the params before the last update. The forwards run with
           w + (s d + gamma [d > 0]) (w - w^{t-1}), d per layer from its module
           (`StageTables.layer_steps`, 0 for module K-1's layers), first with d_0 = 2(K-1);
           E, last and the backward's templates use w, as does the embedding's backward
           (linear in E and first: its gradient does not depend on them). With gamma the
           update adds gamma (w - w^{t-1}) to (1 - gamma) times the optimizer's
           (`StageTables.layer_momentum`).
Memory beyond the weights, per stage: 2 B L D inboxes plus R B L D history ('recompute',
and one extra forward per backward) or R residual sets ('stored': about 11 B L D per
block plus the stage's weights); with a recurrence memory also n B M D live memory and,
for 'recompute', R n B M D of memory history (in 'stored' it is in the residual sets); with
weight prediction or the Nesterov momentum one more copy of the stage's weights
(prev_params); with DC-ASGD R copies
of them (hist_w; the 'stored' residual sets hold them too, not shared); with error
feedback one gradient of them (prev_grad).

All of this is plain static-shape state: checkpointing it checkpoints the pipeline.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import pieces, remedies
from accel.pipeline.layout import Layout
from accel.pipeline.spmd import ring

_tmap = jax.tree_util.tree_map


def slice_mem(mem, start: int, stop: int):
  """The recurrence memory [n, B, M, D] of the stage's layers start..stop-1 (None: none)."""
  return None if mem is None else mem[start:stop]


@dataclasses.dataclass(frozen=True, eq=False)
class StageTables:
  """Static per-stage tables (host numpy): which module each local layer belongs to, who
  owns E / first / last, where the stage's stack is cut into segments A and B."""
  layer_module: np.ndarray   # [S, n] int32: module of each local layer
  layer_delay: np.ndarray    # [S, n] float32: d of each local layer's module, 2(K-1-j)
  layer_steps: np.ndarray    # [S, n] float32: s d + gamma [d > 0] of each local layer
  layer_momentum: np.ndarray  # [S, n] float32: the Nesterov gamma [d > 0] of each
  first_delay: int           # d_0 of module 0's 'first'
  first_steps: float         # s d_0 + gamma
  first_momentum: float      # gamma [d_0 > 0]
  last_stage: int            # the stage of module K-1 (the loss stage)
  owns_first: np.ndarray     # [S] bool
  owns_last: np.ndarray      # [S] bool
  owns_E: np.ndarray         # [S] bool
  counts_E: np.ndarray       # [S] bool: E's summed gradient enters the clip norm once
  split: int                 # a: A = layers[:a], B = layers[a:]
  module_a: np.ndarray       # [S] int32: the module of segment A
  ring_slots: int            # R = 2(K-1)

  @classmethod
  def build(cls, layout: Layout, weight_prediction: float,
            nesterov_momentum: float = 0.0) -> 'StageTables':
    k, s, n = layout.num_modules, layout.num_stages, layout.layers_per_stage
    if layout.tied_ring:
      mods = [[k - 1] * layout.n_last + [0] * layout.n_first] + [[j] * n for j in range(1, s)]
    else:
      mods = [[j] * n for j in range(s)]
    layer_module = np.asarray(mods, np.int32)
    last_stage = layout.stage_of(k - 1)
    owns_first = np.arange(s) == 0
    owns_last = np.arange(s) == last_stage
    layer_delay = np.vectorize(layout.delay)(layer_module).astype(np.float32)
    steps = lambda d: remedies.lookahead_steps(d, weight_prediction, nesterov_momentum)
    d0 = layout.delay(0)
    return cls(layer_module=layer_module, layer_delay=layer_delay,
               layer_steps=np.asarray(steps(layer_delay), np.float32),
               layer_momentum=np.asarray(nesterov_momentum * (layer_delay > 0), np.float32),
               first_delay=d0, first_steps=float(steps(d0)),
               first_momentum=float(nesterov_momentum * (d0 > 0)),
               last_stage=last_stage,
               owns_first=owns_first, owns_last=owns_last, owns_E=owns_first | owns_last,
               counts_E=owns_last, split=layout.n_last if layout.tied_ring else n,
               module_a=layer_module[:, 0], ring_slots=2 * (k - 1))


def stage_arrays(tables: StageTables) -> dict:
  """The tables the step reads inside the shard_map, as device constants indexed by stage:
  layer_module, module_a, owns {'E', 'first', 'last'}, counts_E, layer_steps, layer_delay,
  layer_momentum."""
  return {'layer_module': jnp.asarray(tables.layer_module),
          'module_a': jnp.asarray(tables.module_a),
          'owns': {name: jnp.asarray(v) for name, v in
                   (('E', tables.owns_E), ('first', tables.owns_first),
                    ('last', tables.owns_last))},
          'counts_E': jnp.asarray(tables.counts_E),
          'layer_steps': jnp.asarray(tables.layer_steps),
          'layer_delay': jnp.asarray(tables.layer_delay),
          'layer_momentum': jnp.asarray(tables.layer_momentum)}


class StateLayout:
  """Builds, shards and reads the pipeline state (module docstring) for one program."""

  def __init__(self, model_pieces, layout: Layout, tables: StageTables, tx, mesh,
               stored: bool, keeps_prev: bool, dropout_key,
               delay_compensation: float = 0.0, error_feedback: float = 0.0):
    """keeps_prev: w^{t-1} in the state (weight prediction, the Nesterov momentum);
    dropout_key(batch, module): the key inside the shard_map (`Pipeline`)."""
    self.model_pieces, self.layout, self.tables = model_pieces, layout, tables
    self.tx, self.mesh, self.stored = tx, mesh, stored
    self.keeps_prev, self._dropout_key = keeps_prev, dropout_key
    self.delay_compensation, self.error_feedback = delay_compensation, error_feedback

  def stack(self, params):
    """Model params -> stage-stacked params (zeros where not owned)."""
    lay, s, tables = self.layout, self.layout.num_stages, self.tables
    parts = self.model_pieces.split(params)
    own = lambda mask, tree: _tmap(
        lambda a: jnp.stack([a if m else jnp.zeros_like(a) for m in mask]), tree)
    layers = _tmap(lambda a: jnp.roll(a, lay.roll, axis=0).reshape(s, lay.layers_per_stage,
                                                                   *a.shape[1:]),
                   parts['layers'])
    return {'layers': layers, 'E': own(tables.owns_E, parts['E']),
            'first': own(tables.owns_first, parts['first']),
            'last': own(tables.owns_last, parts['last'])}

  def model_params(self, state):
    """Stage-stacked params -> the model's params."""
    p, lay = state['params'], self.layout
    layers = _tmap(lambda a: jnp.roll(a.reshape(lay.num_layers, *a.shape[2:]), -lay.roll, 0),
                   p['layers'])
    last = lay.stage_of(lay.num_modules - 1)
    return self.model_pieces.join(p['E'][0], _tmap(lambda a: a[0], p['first']), layers,
                                  _tmap(lambda a: a[last], p['last']))

  def specs(self):
    st, dt = P('stage'), P('stage', 'data')
    specs = {'step': P(), 'params': st, 'opt': st, 'act_in': dt, 'grad_in': dt,
             'hist': P('stage', None, 'data'), 'tokens': P(None, 'data')}
    if self.model_pieces.has_memory:
      specs['mem'] = P('stage', None, 'data')
      if not self.stored:
        specs['hist_mem'] = P('stage', None, None, 'data')
    if self.keeps_prev:
      specs['prev_params'] = st
    for key, on in (('hist_w', self.delay_compensation), ('prev_grad', self.error_feedback),
                    ('has_prev', self.error_feedback)):
      if on:
        specs[key] = st
    return specs

  def shardings(self, state):
    specs = self.specs()
    return {key: _tmap(lambda _: NamedSharding(self.mesh, specs[key]), v)
            for key, v in state.items()}

  def init(self, params, batch_size: int, seq_len: int):
    """Pipeline state for the model's `params`; batch_size is the global batch."""
    cfg, s, r = self.model_pieces.cfg, self.layout.num_stages, self.tables.ring_slots
    stacked = self.stack(params)
    init_layers = jax.vmap(jax.vmap(self.tx.init))
    init_owned = jax.vmap(self.tx.init, axis_size=s)   # axis_size: 'first' may be {}
    x = lambda: jnp.zeros((s, batch_size, seq_len, cfg.d_model), cfg.dtype)
    tok = lambda: jnp.zeros((2 * self.layout.num_modules - 1, batch_size, seq_len), jnp.int32)
    state = {'step': jnp.zeros((), jnp.int32), 'params': stacked,
             'opt': {'layers': init_layers(stacked['layers']), 'E': init_owned(stacked['E']),
                     'first': init_owned(stacked['first']), 'last': init_owned(stacked['last'])},
             'act_in': x(), 'grad_in': x(), 'tokens': {'inputs': tok(), 'targets': tok()}}
    if self.keeps_prev:   # w^{t-1}: before any update, w^0 (a copy: donated apart)
      state['prev_params'] = _tmap(jnp.copy, {'layers': stacked['layers'],
                                              'first': stacked['first']})
    own = {'layers': stacked['layers'], 'first': stacked['first']}
    if self.delay_compensation:   # [S, R, ...]: the forward weights of each slot's batch
      state['hist_w'] = _tmap(lambda a: jnp.zeros((s, r) + a.shape[1:], a.dtype), own)
    if self.error_feedback:
      state['prev_grad'] = _tmap(jnp.zeros_like, own)
      state['has_prev'] = {'layers': jnp.zeros((s, self.layout.layers_per_stage), bool),
                           'first': jnp.zeros((s,), bool)}
    mem = self.model_pieces.zero_memory(self.layout.layers_per_stage, batch_size)
    if mem is not None:    # [S, n, B, M, D]: each stage the memory of its own layers
      state['mem'] = jnp.stack([mem] * s)
    if self.stored:   # per segment, per residual: [S, R, data * size]
      data, sharding = self.mesh.shape['data'], NamedSharding(self.mesh, self.specs()['hist'])
      state['hist'] = {seg: [jnp.zeros((s, r, data * v.size), ring.ring_dtype(v.dtype),
                                       device=sharding) for v in leaves]
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
    A's and of segment B's jax.vjp on one data shard (`ring.residuals`), what one history
    slot holds.

    Traced under the same shard_map as the step (weights varying over 'data', memory and
    keys over both axes, B's first block over 'stage'), because the residual list depends
    on it (a few scalar residuals appear there).
    """
    lay, mp, a = self.layout, self.model_pieces, self.tables.split
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
        vjp = ring.block_vjp(mp, pieces.slice_layers(layers, start, stop), x[0],
                             slice_mem(mem, start, stop), key, first_layer)[1]
        shapes[seg] = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in ring.residuals(vjp)]
      return x

    data, s = self.mesh.shape['data'], lay.num_stages
    x = jax.ShapeDtypeStruct((s, data * local_batch, seq_len, mp.cfg.d_model), mp.cfg.dtype)
    jax.eval_shape(jax.shard_map(probe, mesh=self.mesh, in_specs=(P('stage'), P('stage', 'data')),
                                 out_specs=P('stage', 'data')), layers_SxN, x)
    return shapes
