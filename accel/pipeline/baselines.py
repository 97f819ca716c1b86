"""GPipe (Huang et al. 2019), the synchronous pipeline the Ouroboros benchmarks compare with.

The other baselines are the spine's own steps: one device and data parallelism are
`accel.trainer.data_parallel_trainer` (`accel.train.build`; Transformer-XL carries its
memory in the state as segment training does). GPipe has no place in the spine, so its
step lives here.

It computes exactly the synchronous gradient of the mean loss over the global batch (it
trains like a single device, up to float32 rounding). Over mesh axes ('data', 'stage'):
the blocks cut into S stages of n = L/S (stacked [S, n, ...] over 'stage'), the local
batch into M micro-batches; forward ticks i = 0 .. M+S-2, stage s runs micro-batch i-s
and sends it on (`ppermute`); jax.grad of those ticks is the reverse pipeline; one Adam
step per batch. Bubble (S-1)/(M+S-1): S stages reach at most S M/(M+S-1) times one
device's throughput (1.6x at S=2, M=4).

What the compiled step holds, so that it can reach that bound (tests/test_pipeline_baselines.py
counts its loops and conditionals: none):
  - the ticks unrolled, as the Ouroboros stage program runs (a loop over them is a device
    `while` whose trip XLA:GPU brings back to the host, and inside which no transfer
    overlaps the next tick's compute);
  - each micro-batch leaving the last stage kept as it is (a static list, no update of a
    whole-batch buffer per tick);
  - the head (final LN, tied logits, loss) split across the stages by rows: the last stage
    sends rows [j b/S, (j+1) b/S) of its outputs to stage j (S-1 ppermutes), so every stage
    computes the head on b/S rows instead of every stage computing it on all b and all but
    one discarding it (a V x D matmul and its backward: at a 50304 vocabulary ~15% of a
    GPT-2-medium step). The embedding (a gather) still runs on every stage, used on stage 0.
In SPMD every stage runs every tick: the bubble ticks compute on zeros rather than idle,
which takes the same time. Deterministic only (no dropout); TransformerLM only (no
memory per micro-batch). Naive model parallelism is M = 1.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from accel.pipeline import families, pieces

_tmap = jax.tree_util.tree_map


def _pipeline_loss(cfg, num_stages: int, num_microbatches: int):
  """The loss of the local batch inside the shard_map: GPipe's forward ticks, then the
  head on this stage's rows of the outputs (module docstring)."""
  s, m = num_stages, num_microbatches
  to_next = [(j, j + 1) for j in range(s - 1)]

  def loss_fn(params, batch):
    me = lax.axis_index('stage')
    layers = _tmap(lambda a: a[0], params['layers'])
    b, seq = batch['inputs'].shape
    if b % m or b % s:
      raise ValueError(f'local batch {b} not divisible by {m} micro-batches and {s} stages')
    x_BxLxD = pieces.embed(cfg, params['E'], params['pos'], batch['inputs'])
    x_MxbxLxD = x_BxLxD.reshape(m, b // m, seq, cfg.d_model)
    received = lax.pcast(jnp.zeros_like(x_MxbxLxD[0]), 'stage', to='varying')
    outputs = []
    for i in range(m + s - 1):
      y = pieces.blocks(cfg, layers, jnp.where(me == 0, x_MxbxLxD[min(i, m - 1)], received))
      if i >= s - 1:                 # micro-batch i-(S-1) leaves the last stage
        outputs.append(y)
      if i < m + s - 2:
        received = lax.ppermute(y, 'stage', to_next)
    h_SxrxLxD = jnp.concatenate(outputs).reshape(s, b // s, seq, cfg.d_model)
    rows = jnp.where(me == s - 1, h_SxrxLxD[s - 1], 0.0)   # its own rows; elsewhere 0 plus
    for j in range(s - 1):           # the last stage's rows for stage j, sent to stage j
      rows = rows + lax.ppermute(h_SxrxLxD[j], 'stage', [(s - 1, j)])
    targets = lax.dynamic_slice_in_dim(batch['targets'], me * (b // s), b // s)
    loss = pieces.head_loss(cfg, params['E'], params['fln'], rows, targets)
    return lax.pmean(lax.pmean(loss, 'stage'), 'data')

  return loss_fn


def gpipe(cfg, tx, mesh: jax.sharding.Mesh, num_microbatches: int):
  """GPipe over mesh axes ('data', 'stage'); see the module docstring.

  Returns a `GPipe`: init(params) -> (params, opt); step(params, opt, batch) -> (params,
  opt, loss), jitted, the batch placed with batch_sharding (`run` places it); to_model.
  Its params are the TransformerLM (scan layout) params with the layer axis reshaped to
  [S, n, ...]; `to_model` undoes it.
  """
  if cfg.dropout_rate:
    raise ValueError('the GPipe baseline runs without dropout; set dropout_rate=0')
  mp = families.for_config(cfg)
  if not isinstance(mp, pieces.TransformerLMPieces):
    raise ValueError(f'gpipe runs the TransformerLM only, not {type(cfg).__name__}')
  cfg, s = mp.cfg, mesh.shape['stage']
  specs = {'layers': P('stage'), 'E': P(), 'pos': P(), 'fln': P()}
  loss_fn = jax.shard_map(_pipeline_loss(cfg, s, num_microbatches), mesh=mesh,
                          in_specs=(specs, P('data')), out_specs=P())

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  step = jax.jit(step, donate_argnums=(0, 1))
  batch_sh = NamedSharding(mesh, P('data'))

  def from_model(params):
    layers = _tmap(lambda a: a.reshape(s, a.shape[0] // s, *a.shape[1:]),
                   params['stack']['layers'])
    return {'layers': layers, 'E': params['token_embed']['embedding'],
            'pos': params['pos_embed'], 'fln': params.get('final_ln', {})}

  def init(params):   # a copy: the step donates its inputs
    p = from_model(_tmap(jnp.copy, params))
    p = {key: _tmap(lambda a, spec=specs[key]: jax.device_put(a, NamedSharding(mesh, spec)), v)
         for key, v in p.items()}
    return p, jax.jit(tx.init)(p)

  def to_model(p):
    layers = _tmap(lambda a: a.reshape(-1, *a.shape[2:]), p['layers'])
    out = {'token_embed': {'embedding': p['E']}, 'pos_embed': p['pos'],
           'stack': {'layers': layers}}
    if cfg.pre_ln:
      out['final_ln'] = p['fln']
    return out

  return GPipe(init=init, step=step, to_model=to_model, batch_sharding=batch_sh)


class GPipe(NamedTuple):
  init: Callable
  step: Callable              # jitted (params, opt, batch) -> (params, opt, loss)
  to_model: Callable
  batch_sharding: NamedSharding

  def run(self, params, opt_state, batch):
    return self.step(params, opt_state, jax.device_put(batch, self.batch_sharding))
