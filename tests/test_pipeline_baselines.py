"""The pipeline benchmarks' synchronous baselines train exactly like one device.

Subprocess with 4 simulated CPU devices; two Adam steps of a tiny model; parameters and
losses compared with plain jax.grad training on one device, to float32 rounding:
  - GPipe (`accel.pipeline.baselines`) as naive model parallelism (1 x 4, M = 1) and on a
    2 x 2 mesh with M = 2; its compiled step holds no loop or conditional (the ticks are
    unrolled);
  - the spine's data-parallel step (`accel.train.build`, what the benchmarks time as one
    device and data parallelism) on 4 devices, and on Transformer-XL, its memory in the
    state sharded over the 4 devices with the batch rows: equal to segment training with
    the memory carried (parameters, losses, memory).
"""
import json
import os

from tests import background
from tests.helpers import json_result, json_script_job


def _config(model_name):
  from accel import config_lib
  c = config_lib.base_config()
  c.batch_size, c.data.seq_len, c.total_steps = 8, 8, 10
  c.model.update(name=model_name, num_layers=4 if model_name == 'transformer_lm' else 2,
                 d_model=16, num_heads=2, d_ff=32)
  if model_name == 'transformer_xl':   # TransformerXLConfig's defaults: PostLN
    c.model.update(mem_len=4, pre_ln=False)
    c.data.order = 'contiguous'
  c.optimizer.update(name='adam', lr=1e-2, b1=0.9, b2=0.999, eps=1e-4, schedule='constant',
                     warmup_steps=0, clip_norm=0.0, weight_decay=0.0)   # = optax.adam(1e-2, eps=1e-4)
  return c


def _spine_data_parallel(config, params, data, devs):
  """(final params, losses, final state) of the spine's data-parallel step from `params`."""
  import jax
  from accel import train
  from accel.data.input_pipeline import DatasetInfo
  _, trainer = train.build(config, DatasetInfo(kind='lm', vocab_size=32), devs)
  put = lambda b: jax.device_put(b, trainer.batch_sharding)
  state = trainer.init(jax.random.key(0), put(data[0]), params)
  losses = []
  for b in data:
    state, metrics = trainer.train_step(state, put(b), {})
    losses.append(float(metrics['loss']))
  return state.params, losses, state


def _run():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from accel.models.transformer import TransformerConfig, TransformerLM
  from accel.pipeline import baselines, pieces
  from accel.pipeline.spmd import make_mesh

  cfg = TransformerConfig(vocab_size=32, num_layers=4, d_model=16, num_heads=2, d_ff=32,
                          max_len=8, scan_layers=True)
  params = TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  tx = optax.adam(1e-2, eps=1e-4)   # see test_pipeline_reference._adam
  rng = np.random.default_rng(1)
  data = []
  for _ in range(2):
    seq = rng.integers(0, 32, (8, 9)).astype(np.int32)
    data.append({'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:])})
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, b: pieces.full_loss(cfg, p, b['inputs'], b['targets'])))
  ref_p, ref_opt, ref_losses = params, tx.init(params), []
  for b in data:
    loss, g = grad_fn(ref_p, b)
    u, ref_opt = tx.update(g, ref_opt, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
    ref_losses.append(float(loss))

  def compare(final, losses):
    d = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), final, ref_p)
    return {'param': max(jax.tree_util.tree_leaves(d)),
            'loss': max(abs(a - b) for a, b in zip(losses, ref_losses))}

  out = {}
  devs = jax.devices()
  final, losses, _ = _spine_data_parallel(_config('transformer_lm'), params, data, devs)
  out['data_parallel'] = compare(final, losses)
  for name, (d, s, m) in {'naive_mp': (1, 4, 1), 'gpipe_2x2_M2': (2, 2, 2)}.items():
    gp = baselines.gpipe(cfg, tx, make_mesh(d, s, devs[:d * s]), m)
    state = gp.init(params)
    compiled = gp.step.lower(*state, jax.device_put(data[0], gp.batch_sharding)).compile()
    losses = []
    for b in data:
      *state, loss = compiled(*state, jax.device_put(b, gp.batch_sharding))
      losses.append(float(loss))
    out[name] = compare(gp.to_model(state[0]), losses)
    hlo = compiled.as_text()
    out[name]['loops'] = hlo.count(' while(') + hlo.count(' conditional(')
  out['data_parallel_txl'] = _txl_data_parallel(data, devs)
  return out


def _txl_data_parallel(data, devs):
  import jax
  import jax.numpy as jnp
  import optax
  from accel.losses import cross_entropy
  from accel.models import transformer_xl as txl

  cfg = txl.TransformerXLConfig(vocab_size=32, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                                mem_len=4)
  model = txl.TransformerXL(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  tx = optax.adam(1e-2, eps=1e-4)

  def loss_fn(p, mems, batch):
    logits, new_mems = model.apply({'params': p}, batch['inputs'], mems, method='segment')
    return cross_entropy(logits, batch['targets']).mean(), new_mems
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  ref_p, ref_opt, mems, ref_losses = params, tx.init(params), txl.zero_memory(cfg, 8), []
  for b in data:
    (loss, mems), g = grad_fn(ref_p, mems, b)
    u, ref_opt = tx.update(g, ref_opt, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
    ref_losses.append(float(loss))
  final, losses, state = _spine_data_parallel(_config('transformer_xl'), params, data, devs)
  memory = state.mutable['mems']['memory']['hidden']
  diff = lambda x, y: max(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda a, c: float(jnp.abs(a - c).max()), x, y)))
  return {'param': diff(final, ref_p), 'loss': max(abs(a - c) for a, c in
                                                   zip(losses, ref_losses)),
          'mem': diff(memory, mems), 'mem_max': float(jnp.abs(mems).max()),
          'mem_shards': len({str(s.index) for s in memory.addressable_shards})}


def _job():
  return json_script_job(os.path.abspath(__file__), devices=4)


def background_jobs():   # runs beside the other tests (`tests.background`)
  return {'test_baselines_equal_synchronous_training': _job()}


def test_baselines_equal_synchronous_training():
  res = json_result(background.result('test_baselines_equal_synchronous_training', _job))
  assert set(res) == {'data_parallel', 'naive_mp', 'gpipe_2x2_M2', 'data_parallel_txl'}
  for name, r in res.items():
    assert r['loss'] < 1e-5, (name, r)
    assert r['param'] < 2e-6, (name, r)
  for name in ('naive_mp', 'gpipe_2x2_M2'):
    assert res[name]['loops'] == 0, res[name]
  txl = res['data_parallel_txl']
  # float32 rounding relative to the memory's scale (|memory| up to ~2.7 here)
  assert txl['mem'] < 2e-6 * max(1.0, txl['mem_max']) and txl['mem_max'] > 0.1, txl
  assert txl['mem_shards'] == 4, txl


if __name__ == '__main__':
  print(json.dumps(_run()))
