"""Synchronous baselines for the Ouroboros pipeline, on the same devices and global batch.

All three compute exactly the synchronous gradient of the mean loss over the global batch
(so they train like a single device, up to float32 rounding); they differ in how the work
is spread:
  `data_parallel`   jit over a ('data',) mesh: batch sharded, weights replicated, XLA adds
                    the gradient all-reduce. Any model family (`families`); with a
                    recurrence memory (Transformer-XL) the memory [N, B, M, D] is carried
                    from step to step, sharded with the batch: segment training
                    (`accel.tasks.segment_lm`) on contiguous batches.
  `gpipe`           GPipe (Huo et al. are not involved; Huang et al. 2019): the blocks cut
                    into S stages of n = L/S (stacked [S, n, ...] over 'stage'), the batch
                    into M micro-batches; forward ticks i = 0..M+S-2, stage s runs
                    micro-batch i-s and `ppermute`s it on; jax.grad of that loop is the
                    reverse pipeline; one Adam step per batch. Bubble (S-1)/(M+S-1).
                    Embedding, final LN, logits and loss run on every stage (replicated,
                    masked to the last stage's outputs): cheap for byte vocabularies,
                    and an extra cost for large ones that this baseline accepts.
                    TransformerLM only (no memory per micro-batch).
  naive model parallelism = `gpipe` with M = 1: stages in sequence, backward-locked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import families, pieces

_tmap = jax.tree_util.tree_map


def _baseline_pieces(cfg):
  """The baselines run the model deterministically: they refuse dropout, not ignore it."""
  if cfg.dropout_rate:
    raise ValueError('the synchronous baselines run without dropout; set dropout_rate=0')
  return families.for_config(cfg)


def _adam_step(cfg, tx, loss_fn):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def data_parallel(cfg, tx, mesh: jax.sharding.Mesh, batch_size: int = 0, axis: str = 'data'):
  """Returns (init(params) -> (params, opt, mem),
  step(params, opt, mem, batch) -> (params, opt, mem, loss)).

  mem: the recurrence memory of all layers at a fresh stream, zeros [N, batch_size, M, D]
  sharded over `axis` with the batch rows (batch_size: the global batch); None for a model
  without one. The loss is the model's, through its pieces (`families`): head_loss of
  blocks(layers, embed(tokens), mem).
  """
  mp = _baseline_pieces(cfg)
  if mp.has_memory and not batch_size:
    raise ValueError('a model with a recurrence memory needs the batch_size of its rows')
  repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
  mem_sh = NamedSharding(mesh, P(None, axis))

  def step(params, opt_state, mem, batch):
    def loss_fn(p):
      parts = mp.split(p)
      x_BxLxD = mp.embed(parts['E'], parts['first'], batch['inputs'])
      h_BxLxD, new_mem = mp.blocks(parts['layers'], x_BxLxD, mem)
      return mp.head_loss(parts['E'], parts['last'], h_BxLxD, batch['targets']), new_mem
    (loss, mem), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mem, loss
  step = jax.jit(step, donate_argnums=(0, 1, 2), in_shardings=(repl, repl, mem_sh, batch_sh),
                 out_shardings=(repl, repl, mem_sh, repl))

  def init(params):   # a copy: the step donates its inputs
    params = _tmap(jnp.copy, params)
    mem = mp.zero_memory(mp.cfg.num_layers, batch_size)
    return (*jax.device_put((params, tx.init(params)), repl), jax.device_put(mem, mem_sh))
  return init, step


def gpipe(cfg, tx, mesh: jax.sharding.Mesh, num_microbatches: int):
  """GPipe over mesh axes ('data', 'stage'); see the module docstring.

  Params are the TransformerLM (scan layout) params with the layer axis reshaped to
  [S, n, ...]; `to_model` undoes it.
  """
  mp = _baseline_pieces(cfg)
  if not isinstance(mp, pieces.TransformerLMPieces):
    raise ValueError(f'gpipe runs the TransformerLM only, not {type(cfg).__name__}')
  cfg, s, m = mp.cfg, mesh.shape['stage'], num_microbatches

  def pipeline_loss(params, batch):
    me = lax.axis_index('stage')
    layers = _tmap(lambda a: a[0], params['layers'])
    b = batch['inputs'].shape[0]
    if b % m:
      raise ValueError(f'local batch {b} not divisible by {m} micro-batches')
    x_BxLxD = pieces.embed(cfg, params['E'], params['pos'], batch['inputs'])
    x_MxbxLxD = x_BxLxD.reshape(m, b // m, *x_BxLxD.shape[1:])

    def tick(carry, i):
      state_bxLxD, out_MxbxLxD = carry
      inp = jnp.where(me == 0, x_MxbxLxD[jnp.clip(i, 0, m - 1)], state_bxLxD)
      y = pieces.blocks(cfg, layers, inp)
      done = i - (s - 1)          # the micro-batch leaving the last stage at this tick
      out_MxbxLxD = jnp.where((done >= 0) & (me == s - 1),
                              lax.dynamic_update_index_in_dim(
                                  out_MxbxLxD, y, jnp.clip(done, 0, m - 1), 0),
                              out_MxbxLxD)
      return (lax.ppermute(y, 'stage', [(j, j + 1) for j in range(s - 1)]), out_MxbxLxD), None

    init = (jnp.zeros_like(x_MxbxLxD[0]), jnp.zeros_like(x_MxbxLxD))
    init = _tmap(lambda a: lax.pcast(a, 'stage', to='varying'), init)
    (_, out_MxbxLxD), _ = lax.scan(tick, init, jnp.arange(m + s - 1))
    h = out_MxbxLxD.reshape(b, *out_MxbxLxD.shape[2:])
    loss = pieces.head_loss(cfg, params['E'], params['fln'], h, batch['targets'])
    loss = lax.psum(jnp.where(me == s - 1, loss, 0.0), 'stage')
    return lax.pmean(loss, 'data')

  specs = {'layers': P('stage'), 'E': P(), 'pos': P(), 'fln': P()}
  loss_fn = jax.shard_map(pipeline_loss, mesh=mesh, in_specs=(specs, P('data')),
                          out_specs=P())
  batch_sh = NamedSharding(mesh, P('data'))
  step = jax.jit(_adam_step(cfg, tx, loss_fn), donate_argnums=(0, 1))

  def from_model(params):
    layers = _tmap(lambda a: a.reshape(s, a.shape[0] // s, *a.shape[1:]),
                   params['stack']['layers'])
    return {'layers': layers, 'E': params['token_embed']['embedding'],
            'pos': params['pos_embed'], 'fln': params.get('final_ln', {})}

  def init(params):   # a copy: the step donates its inputs
    p = from_model(_tmap(jnp.copy, params))
    shard = lambda tree, spec: _tmap(lambda a: jax.device_put(a, NamedSharding(mesh, spec)),
                                     tree)
    p = {key: shard(v, specs[key]) for key, v in p.items()}
    return p, jax.jit(tx.init)(p)

  def to_model(p):
    layers = _tmap(lambda a: a.reshape(-1, *a.shape[2:]), p['layers'])
    out = {'token_embed': {'embedding': p['E']}, 'pos_embed': p['pos'],
           'stack': {'layers': layers}}
    if cfg.pre_ln:
      out['final_ln'] = p['fln']
    return out

  def run(params, opt_state, batch):
    return step(params, opt_state, jax.device_put(batch, batch_sh))

  return init, run, to_model
