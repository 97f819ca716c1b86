"""Tests of accel.layerdrop: schedule formulas, replicated gates, real skipping, eval, FLOPs."""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from accel import layerdrop, train
from accel.metrics import read_jsonl
from accel.models.transformer import MLP, Attention, Block, TransformerConfig, TransformerLM
from configs import lm

L = 3
TINY = dict(vocab_size=32, num_layers=L, d_model=16, num_heads=2, d_ff=32, max_len=8)


def _ld(enabled=True, theta_bar=0.5, gamma=0.001):
  return ml_collections.ConfigDict(dict(enabled=enabled, theta_bar=theta_bar, gamma=gamma))


def _tokens():
  return jax.random.randint(jax.random.key(0), (2, 8), 0, TINY['vocab_size'])


def test_theta_and_keep_probs_match_formula():
  theta_bar, gamma, num_layers = 0.5, 0.001, 12
  for t in [0, 1, 100, 1000, 5000, 100000]:
    want_theta = (1 - theta_bar) * np.exp(-gamma * t) + theta_bar
    np.testing.assert_allclose(layerdrop.theta(t, theta_bar, gamma), want_theta, rtol=1e-6)
    want_p = [1 - (l / num_layers) * (1 - want_theta) for l in range(1, num_layers + 1)]
    got_p = layerdrop.keep_probs(t, num_layers, theta_bar, gamma)
    np.testing.assert_allclose(got_p, want_p, rtol=1e-6)
  assert float(layerdrop.theta(0, theta_bar, gamma)) == 1.0
  np.testing.assert_array_equal(layerdrop.keep_probs(0, num_layers, theta_bar, gamma), 1.0)
  # Far into training: theta -> theta_bar, top layer kept with p = theta_bar, 8.75 layers.
  p_far = layerdrop.keep_probs(10**6, num_layers, theta_bar, gamma)
  np.testing.assert_allclose(p_far[-1], theta_bar, rtol=1e-6)
  np.testing.assert_allclose(p_far.sum(), layerdrop.expected_layers(num_layers, 0.5), rtol=1e-6)
  assert layerdrop.expected_layers(12, 0.5) == 8.75


def test_gate_frequencies_follow_keep_probs():
  keep_probs_L = layerdrop.keep_probs(10**6, 4, 0.5, 0.001)  # [0.875, 0.75, 0.625, 0.5]
  n = 4000
  gates_NxL = jax.vmap(lambda s: layerdrop.sample_gates(layerdrop.gate_key(0, s),
                                                        keep_probs_L))(jnp.arange(n))
  freq_L = np.asarray(gates_NxL).mean(0)
  sigma_L = np.sqrt(np.asarray(keep_probs_L) * (1 - np.asarray(keep_probs_L)) / n)
  assert np.all(np.abs(freq_L - np.asarray(keep_probs_L)) < 4 * sigma_L), freq_L


_DEVICES_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, ml_collections
    from jax.sharding import Mesh, PartitionSpec as P
    from accel import layerdrop
    assert jax.device_count() == 4, jax.devices()
    ld = ml_collections.ConfigDict(dict(enabled=True, theta_bar=0.5, gamma=0.01))
    mesh = Mesh(jax.devices(), ('data',))

    def per_device(step_1):  # runs once on each of the 4 devices
      gates_L, _, _ = layerdrop.step_gates(ld, 6, 7, step_1[0], train=True)
      return gates_L[None].astype(jnp.int32)

    out = {}
    for step in [10, 500, 501, 2000]:
      steps_4 = jnp.full((4,), step, jnp.int32)
      f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P('data'), out_specs=P('data')))
      out[step] = jax.device_get(f(steps_4)).tolist()
    print(json.dumps(out))
""")


def test_gates_identical_across_4_simulated_devices_and_processes():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  proc = subprocess.run([sys.executable, '-c', _DEVICES_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  per_step = json.loads(proc.stdout.strip().splitlines()[-1])
  ld = _ld(theta_bar=0.5, gamma=0.01)
  for step, gates_4xL in per_step.items():
    assert all(row == gates_4xL[0] for row in gates_4xL), (step, gates_4xL)
    # This process (another "host") draws the same gates for the same (seed, step).
    here, _, _ = layerdrop.step_gates(ld, 6, 7, int(step), train=True)
    assert gates_4xL[0] == np.asarray(here).astype(int).tolist()
  assert any(0 in rows[0] for rows in per_step.values())  # some layer was dropped


def _counting_model(scan_layers, calls):
  def counting_dot_general(*args, **kwargs):
    jax.debug.callback(lambda: calls.append(1))
    return lax.dot_general(*args, **kwargs)
  cfg = TransformerConfig(**TINY, scan_layers=scan_layers, dot_general=counting_dot_general)
  return TransformerLM(cfg)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_dropped_block_does_no_compute(scan_layers):
  calls = []
  model = _counting_model(scan_layers, calls)
  tokens = _tokens()
  params = model.init(jax.random.key(1), tokens)
  apply = jax.jit(lambda p, g, k: model.apply(p, tokens, train=True, gates_L=g, keep_probs_L=k))
  keep_probs_L = jnp.array([1.0, 0.5, 0.25])
  hlo = apply.lower(params, jnp.ones(L, bool), keep_probs_L).compile().as_text()
  assert 'conditional(' in hlo
  for gates in ([1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 0, 0]):
    calls.clear()
    out = apply(params, jnp.array(gates, bool), keep_probs_L)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == 4 * sum(gates), (gates, len(calls))  # qkv, out, fc_in, fc_out
  # All gates 0: the stack is the identity, so the output is the head applied to embeddings.
  out0 = apply(params, jnp.zeros(L, bool), keep_probs_L)
  bound = model.bind(params)
  np.testing.assert_allclose(out0, bound.logits(bound.embed(tokens)), rtol=1e-6, atol=1e-6)


def test_kept_block_is_scaled_by_inverse_keep_prob():
  cfg = TransformerConfig(**TINY)
  model = TransformerLM(cfg)
  tokens = _tokens()
  params = model.init(jax.random.key(1), tokens)
  bound = model.bind(params)
  x = bound.embed(tokens)
  p = 0.4
  got = bound.stack(x, jnp.array([1, 0, 0], bool), jnp.array([p, 1.0, 1.0]))
  block0 = {'params': params['params']['stack']['block_0']}
  sublayer_outs = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (Attention, MLP)):
      sublayer_outs.append(out)
    return out

  with nn.intercept_methods(record):
    want = Block(cfg).apply(block0, x, 1 / p, True)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # block 0 only, scale 1/p_1
  attn_out, mlp_out = sublayer_outs
  np.testing.assert_allclose(want, x + attn_out / p + mlp_out / p, rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_and_runs_all_layers():
  calls = []
  model = _counting_model(False, calls)
  tokens = _tokens()
  params = model.init(jax.random.key(1), tokens)
  ld = _ld(theta_bar=0.5, gamma=1.0)  # at step 1000 the training gates would drop layers
  gates_L, keep_probs_L, metrics = layerdrop.step_gates(ld, L, 0, 1000, train=False)
  assert gates_L is None and keep_probs_L is None
  assert float(metrics['layerdrop/layers_run']) == L
  evaluate = jax.jit(lambda p: model.apply(p, tokens, train=False, gates_L=gates_L,
                                           keep_probs_L=keep_probs_L))
  outs = []
  for _ in range(2):
    calls.clear()
    outs.append(jax.block_until_ready(evaluate(params)))
    jax.effects_barrier()
    assert len(calls) == 4 * L
  np.testing.assert_array_equal(outs[0], outs[1])
  full = model.apply(params, tokens, train=True, gates_L=jnp.ones(L, bool),
                     keep_probs_L=jnp.ones(L))
  np.testing.assert_allclose(outs[0], full, rtol=1e-6, atol=1e-6)


def _train_loss_and_grads(ld, model, params, tokens, step):
  def loss_fn(params):
    gates_L, keep_probs_L, metrics = layerdrop.step_gates(ld, L, 0, step, train=True)
    logits = model.apply(params, tokens, train=True, gates_L=gates_L, keep_probs_L=keep_probs_L)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1).mean()
    return nll, metrics
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def test_theta_bar_one_reproduces_baseline_bitwise():
  # At this size the cond path with every gate 1 differs from the plain stack in the
  # last bit of some gradients; theta_bar = 1 must take the plain path.
  model = TransformerLM(TransformerConfig(**{**TINY, 'd_model': 32, 'd_ff': 64, 'max_len': 16}))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, TINY['vocab_size'])
  params = model.init(jax.random.key(1), tokens)
  (loss_b, _), grads_b = _train_loss_and_grads(_ld(enabled=False), model, params, tokens, 7)
  (loss_1, metrics), grads_1 = _train_loss_and_grads(_ld(theta_bar=1.0), model, params, tokens, 7)
  assert float(metrics['layerdrop/theta']) == 1.0
  assert float(metrics['layerdrop/layers_run']) == L
  np.testing.assert_array_equal(loss_1, loss_b)
  jax.tree.map(np.testing.assert_array_equal, grads_1, grads_b)


def test_executed_flops_discount_the_dropped_blocks():
  tokens = _tokens()

  def step_flops(num_layers, switchable):
    model = TransformerLM(TransformerConfig(**{**TINY, 'num_layers': num_layers}))
    params = model.init(jax.random.key(1), tokens)
    gates = (jnp.ones(num_layers, bool), jnp.ones(num_layers)) if switchable else (None, None)

    def loss(params, gates):
      return model.apply(params, tokens, train=True, gates_L=gates[0],
                         keep_probs_L=gates[1]).sum()
    return jax.jit(jax.grad(loss)).lower(params, gates).compile().cost_analysis()['flops']

  full = step_flops(L, switchable=False)
  switchable = step_flops(L, switchable=True)
  block = layerdrop.block_train_flops(TransformerConfig(**TINY), *tokens.shape)
  # XLA counts a cond's costliest branch: one more switchable block adds one block's
  # forward + backward (with the recomputation of SWITCHABLE_REMAT_POLICY).
  np.testing.assert_allclose(switchable - step_flops(L - 1, switchable=True), block, rtol=1e-2)
  # That recomputation is elementwise work only: a few % at this tiny width.
  assert full < switchable < 1.1 * full
  assert layerdrop.executed_flops(switchable, block, L, 1) == pytest.approx(switchable - 2 * block)


def test_training_run_logs_schedule_and_executed_flops(tmp_path):
  """The decoder LM of the spine, scanned layers, dropping switched on by config only."""
  config = lm.get_config('smoke')
  config.update_from_flattened_dict({
      'progress_bar': False, 'total_steps': 8, 'log_every': 1, 'eval_every': 8,
      'checkpoint_every': 8, 'model.num_layers': 4, 'model.scan_layers': True,
      'layerdrop.enabled': True, 'layerdrop.gamma': 0.5})
  train.train_and_evaluate(config, str(tmp_path))
  logged = read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [m['step'] for m in logged] == list(range(1, 9))
  layers_run = np.array([m['train/layerdrop/layers_run'] for m in logged])
  flops = np.array([m['perf/flops_per_step'] for m in logged])
  for m in logged:   # metrics logged at step s are those of step index s - 1
    np.testing.assert_allclose(m['train/layerdrop/theta'],
                               0.5 * np.exp(-0.5 * (m['step'] - 1)) + 0.5, rtol=1e-6)
    want, _, _ = layerdrop.step_gates(config.layerdrop, 4, config.seed, m['step'] - 1, True)
    assert m['train/layerdrop/layers_run'] == int(np.sum(want))
  assert layers_run[0] == 4 and layers_run.min() < 4
  block = layerdrop.block_train_flops(
      TransformerConfig(**{**TINY, 'num_layers': 4, 'd_model': 32, 'd_ff': 64,
                           'max_len': 32, 'vocab_size': 256}),
      config.batch_size, config.data.seq_len)
  np.testing.assert_allclose(flops - flops[0], (layers_run - 4) * block, rtol=1e-6)
