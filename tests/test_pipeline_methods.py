"""The methods that compose with the pipeline, each against itself without the pipeline.

For each pair (pipeline + low precision, pipeline + standardization loss), in a subprocess
with 4 simulated CPU devices, one tiny config (K=2 untied: one block per stage, the
activations and gradients sent between 2 stages) built by the spine (`accel.train.build`):
  1. the pipeline's trainer (the SPMD program with the methods' hooks, as the loop runs
     it) against the single-device `Reference` with the same hooks, iteration by iteration:
     the delayed algorithm with the method, both ways;
  2. the reference in its synchronous mode (every delay 0) against the spine's
     data-parallel step with the same method enabled (the model's own apply, where the
     method attaches through `Task`): the hooks mean in the pipeline's pieces what they
     mean in the model.
Low precision: e5m2 GEMMs accumulated in e6m9, loss scale 1024, e6m9 weights / Adam state
with round-to-nearest updates (stochastic rounding draws per-tensor bits, which differ
between the layouts by construction); 'stored' (the GEMMs' residuals in the history ring);
one data shard (with more, each shard accumulates its weight gradients over its own rows
in e6m9 before they are averaged: not the single device's rounding, `accel.lowprec.method`).
The standardization loss: every fc_in, 'global' moments over a data axis of 2 (the pmean
path), 'recompute' (the delayed backward's moments from the re-run); the data-parallel
model is not scanned, so there its term is a value in the loss, in the pipeline a
gradient-only identity.
Tolerance: float32 rounding (5e-6 on parameters of ~0.02-1: the moments are summed in
another order, per shard then averaged); without the pipeline's stdloss hook the
parameters differ from the data-parallel step's by ~0.06.
"""
import json
import os

from tests import background
from tests.helpers import json_result, json_script_job

ITERATIONS = 5       # 2K+1 at K=2: past every module's warm-up
SYNC_STEPS = 3
CASES = {'lowprec': dict(backward='stored', data=1),
         'stdloss': dict(backward='recompute', data=2)}


def _config(method, backward):
  from accel import config_lib
  c = config_lib.base_config()
  c.batch_size, c.data.seq_len, c.total_steps = 4, 8, 100
  c.model.update(num_layers=2, d_model=16, num_heads=2, d_ff=32)
  c.optimizer.update(name='adam', lr=1e-2, eps=1e-4, schedule='constant', warmup_steps=0,
                     clip_norm=0.0, weight_decay=0.0)
  c.pipeline.update(enabled=True, num_modules=2, tied_ring=False, backward_weights=backward)
  if method == 'lowprec':
    c.lowprec.update(enabled=True, loss_scale=1024.0, update_rounding='nearest')
  else:
    c.stdloss.update(enabled=True, layers='fc_in$', weight=0.01, moments='global')
  return c


def _run_case(method, backward, data):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from accel import optim, train
  from accel.data.input_pipeline import DatasetInfo
  from accel.pipeline.hooks import MethodHooks
  from accel.pipeline.layout import Layout
  from accel.pipeline.reference import Reference

  config = _config(method, backward)
  info = DatasetInfo(kind='lm', vocab_size=32)
  task, trainer = train.build(config, info, jax.devices()[:2 * data])
  methods = task.methods
  rng = np.random.default_rng(1)
  batches = []
  for _ in range(ITERATIONS):
    seq = rng.integers(0, 32, (config.batch_size, 9)).astype(np.int32)
    batches.append({'inputs': seq[:, :-1], 'targets': seq[:, 1:]})
  device_batch = lambda b: jax.device_put(b, trainer.batch_sharding)
  state = trainer.init(jax.random.key(0), device_batch(batches[0]))
  params0 = jax.device_get(trainer.model_params(state))

  tx, _ = optim.build_optimizer(config.optimizer, config.total_steps, clip=False)
  tx = methods.wrap_optimizer(tx)
  hooks = MethodHooks(outputs=methods.transform_outputs, wrap_blocks=methods.wrap_blocks)
  layout = Layout(config.model.num_layers, 2, False)
  diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))
  out = {'pipeline_vs_reference': {'param': 0.0, 'loss': 0.0, 'losses': 0}}
  ref = Reference(task.model.cfg, layout, tx, backward, hooks=hooks)
  ref_state = ref.init(params0, config.batch_size)
  for b in batches:
    state, metrics = trainer.train_step(state, device_batch(b), {})
    ref_state, rm = ref.step(ref_state, jax.tree.map(jnp.asarray, b))
    worst = out['pipeline_vs_reference']
    worst['param'] = max(worst['param'], diff(trainer.model_params(state),
                                              ref.model_params(ref_state)))
    if rm['loss'] is not None:
      worst['loss'] = max(worst['loss'], abs(float(metrics['loss']) - float(rm['loss'])))
      worst['losses'] += 1
  out['moved'] = diff(trainer.model_params(state), params0)

  # Zero delay: the reference's synchronous mode against the spine's data-parallel step.
  dp_config = _config(method, backward)
  dp_config.pipeline.enabled = False
  _, dp_trainer = train.build(dp_config, info, jax.devices()[:data])
  dp_batch = lambda b: jax.device_put(b, dp_trainer.batch_sharding)
  dp_state = dp_trainer.init(jax.random.key(0), dp_batch(batches[0]), params0)
  sync = Reference(task.model.cfg, layout, tx, backward, synchronous=True, hooks=hooks)
  sync_state = sync.init(params0, config.batch_size)
  worst = out['synchronous_vs_data_parallel'] = {'param': 0.0, 'loss': 0.0}
  for b in batches[:SYNC_STEPS]:
    dp_state, dp_metrics = dp_trainer.train_step(dp_state, dp_batch(b), {})
    sync_state, rm = sync.step(sync_state, jax.tree.map(jnp.asarray, b))
    # The data-parallel loss holds weight * L as a value; the pipeline's term is gradient-only.
    std_value = config.stdloss.weight * float(dp_metrics.get('stdloss/loss', 0.0))
    out['dp_stdloss_value'] = std_value
    worst['loss'] = max(worst['loss'],
                        abs(float(dp_metrics['loss']) - std_value - float(rm['loss'])))
    worst['param'] = max(worst['param'], diff(dp_state.params,
                                              sync.model_params(sync_state)))
  if method == 'lowprec':
    from accel.lowprec import formats
    representable = jax.jit(lambda tree: jnp.stack([
        jnp.all(formats.is_representable(leaf, 'e6m9')) for leaf in jax.tree.leaves(tree)]).all())
    out['representable'] = bool(representable(trainer.model_params(state)))
  return out


def _job():
  return json_script_job(os.path.abspath(__file__), devices=4)


def background_jobs():   # runs beside the other tests (`tests.background`)
  return {'test_methods_compose_with_the_pipeline': _job()}


def test_methods_compose_with_the_pipeline():
  res = json_result(background.result('test_methods_compose_with_the_pipeline', _job))
  assert set(res) == set(CASES)
  for method, r in res.items():
    assert r['pipeline_vs_reference']['losses'] == ITERATIONS - 1, (method, r)
    for link in ('pipeline_vs_reference', 'synchronous_vs_data_parallel'):
      assert r[link]['loss'] < 1e-5, (method, link, r)
      assert r[link]['param'] < 5e-6, (method, link, r)
    assert r['moved'] > 0.01, (method, r)
  assert res['lowprec']['representable'], res['lowprec']   # e6m9 weights throughout
  assert res['stdloss']['dp_stdloss_value'] > 0.1, res['stdloss']   # the term is there


if __name__ == '__main__':
  print(json.dumps({m: _run_case(m, **kw) for m, kw in CASES.items()}))
