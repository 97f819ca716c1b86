"""Data parallelism, naive model parallelism and GPipe train exactly like one device.

Subprocess with 4 simulated CPU devices; two Adam steps of a tiny model; parameters and
losses compared with plain jax.grad training on one device, to float32 rounding. Also
data parallelism on Transformer-XL, its memory sharded over the 4 devices with the batch
rows: equal to segment training with the memory carried (parameters, losses, memory).
"""
import json
import os
import subprocess
import sys


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
  init, step = baselines.data_parallel(cfg, tx, jax.sharding.Mesh(np.asarray(devs), ('data',)))
  state, losses = init(params), []
  for b in data:
    *state, loss = step(*state, b)
    losses.append(float(loss))
  out['data_parallel'] = compare(state[0], losses)
  for name, (d, s, m) in {'naive_mp': (1, 4, 1), 'gpipe_2x2_M2': (2, 2, 2)}.items():
    init, step, to_model = baselines.gpipe(cfg, tx, make_mesh(d, s, devs[:d * s]), m)
    state, losses = init(params), []
    for b in data:
      *state, loss = step(*state, b)
      losses.append(float(loss))
    out[name] = compare(to_model(state[0]), losses)
  out['data_parallel_txl'] = _txl_data_parallel(data, devs)
  return out


def _txl_data_parallel(data, devs):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from accel.losses import cross_entropy
  from accel.models import transformer_xl as txl
  from accel.pipeline import baselines

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
  init, step = baselines.data_parallel(
      cfg, tx, jax.sharding.Mesh(np.asarray(devs), ('data',)), batch_size=8)
  state, losses = init(params), []
  for b in data:
    *state, loss = step(*state, b)
    losses.append(float(loss))
  diff = lambda x, y: max(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda a, c: float(jnp.abs(a - c).max()), x, y)))
  return {'param': diff(state[0], ref_p), 'loss': max(abs(a - c) for a, c in
                                                       zip(losses, ref_losses)),
          'mem': diff(state[2], mems), 'mem_max': float(jnp.abs(mems).max()),
          'mem_shards': len(state[2].sharding.device_set)}


def test_baselines_equal_synchronous_training():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(res) == {'data_parallel', 'naive_mp', 'gpipe_2x2_M2', 'data_parallel_txl'}
  for name, r in res.items():
    assert r['loss'] < 1e-5, (name, r)
    assert r['param'] < 2e-6, (name, r)
  txl = res['data_parallel_txl']
  assert txl['mem'] < 2e-6 and txl['mem_max'] > 0.1, txl
  assert txl['mem_shards'] == 4, txl


if __name__ == '__main__':
  print(json.dumps(_run()))
