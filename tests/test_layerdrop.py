"""Tests of accel.layerdrop: schedule formulas, host-drawn gates shared by devices and
processes, program N runs exactly N blocks with no control flow, equality with the full
model with dropped blocks as the identity, theta_bar = 1 is the baseline, stop/resume."""
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accel import layerdrop, methods, programs, train
from accel.data.input_pipeline import DatasetInfo
from accel.metrics import read_jsonl
from accel.models.encoder import MaskedLM
from accel.models.transformer import MLP, Attention, Block, TransformerConfig, TransformerLM
from configs import pld_bert
from tests.helpers import run_python

L = 3
TINY = dict(vocab_size=32, num_layers=L, d_model=16, num_heads=2, d_ff=32, max_len=8)


def _tokens():
  return jax.random.randint(jax.random.key(0), (2, 8), 0, TINY['vocab_size'])


def _bert_config(**overrides):
  """configs/pld_bert.py at a tiny size: 3 blocks of width 16, batch 4 x 16."""
  c = pld_bert.get_config('smoke')
  c.update_from_flattened_dict({
      'progress_bar': False, 'batch_size': 4, 'data.seq_len': 16, 'model.num_layers': L,
      'model.d_model': 16, 'model.num_heads': 2, 'model.d_ff': 32, **overrides})
  return c


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


STEPS = (10, 500, 501, 2000)

_DEVICES_SCRIPT = f"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from accel import layerdrop
    from tests.test_layerdrop import _bert_config
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(jax.devices(), ('data',))

    def per_device(step_1):  # runs once on each of the 4 devices
      gates_L, _, _ = layerdrop.step_gates(6, 0.5, 0.01, 7, step_1[0])
      return gates_L[None].astype(jnp.int32)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P('data'), out_specs=P('data')))
    config = _bert_config(seed=7, **{{'model.num_layers': 6, 'layerdrop.gamma': 0.01}})
    out = {{}}
    for step in {STEPS}:
      ids = layerdrop.METHOD.plan(config, step).model_kwargs['layer_ids_N']
      out[step] = [jax.device_get(f(jnp.full((4,), step, jnp.int32))).tolist(), ids.tolist()]
    print(json.dumps(out))
"""


def test_gates_identical_across_4_simulated_devices_and_processes():
  proc = run_python(_DEVICES_SCRIPT, devices=4, timeout=120)
  assert proc.returncode == 0, proc.stderr
  per_step = json.loads(proc.stdout.strip().splitlines()[-1])
  config = _bert_config(seed=7, **{'model.num_layers': 6, 'layerdrop.gamma': 0.01})
  for step, (gates_4xL, other_process_ids) in per_step.items():
    assert all(row == gates_4xL[0] for row in gates_4xL), (step, gates_4xL)
    # This process (another "host") plans the same kept layers for the same (seed, step),
    # and they are the gates' ones, with p_l of the formula.
    plan = layerdrop.METHOD.plan(config, int(step))
    ids = plan.model_kwargs['layer_ids_N']
    assert ids.dtype == np.int32 and ids.tolist() == other_process_ids
    assert ids.tolist() == np.flatnonzero(gates_4xL[0]).tolist()
    np.testing.assert_allclose(plan.model_kwargs['keep_probs_N'],
                               layerdrop.keep_probs(int(step), 6, 0.5, 0.01)[ids], rtol=1e-6)
    assert plan.metrics['layerdrop/layers_run'] == len(ids)
  assert any(0 in rows[0][0] for rows in per_step.values())  # some layer was dropped


def _built(config):
  """(task, trainer, abstract state, abstract batch) of `config`, nothing compiled."""
  task, trainer = train.build(config, DatasetInfo(kind='lm', vocab_size=256))
  s = config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, s), jnp.int32, sharding=trainer.batch_sharding)
           for k in ('inputs', 'targets')}
  state = jax.eval_shape(trainer.init, jax.random.key(0), batch)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                      sharding=trainer.replicated), state)
  return task, trainer, state, batch


def _plan_of(ids, probs):
  return {'layer_ids_N': jax.ShapeDtypeStruct((len(ids),), jnp.int32),
          'keep_probs_N': jax.ShapeDtypeStruct((len(probs),), jnp.float32)}


def test_program_n_runs_exactly_n_blocks_without_control_flow():
  """The BERT train step (as train.build gives the loop) for N = 0..L kept blocks, lowered
  for GPU (jax.export: no GPU needed). On CPU jax's threefry RNG (masking, dropout) lowers
  to a rolled while loop; on GPU it is unrolled, so a GPU program has no loop at all."""
  _, trainer, state, batch = _built(_bert_config())
  texts = [jax.export.export(trainer.train_step, platforms=['cuda'])(
      state, batch, _plan_of(range(n), range(n))).mlir_module() for n in range(L + 1)]
  for text in texts:
    for op in ('stablehlo.case', 'stablehlo.if', 'stablehlo.while'):
      assert op not in text, op
  # A block's forward has 6 matmuls (qkv, q.k, p.v, out, fc_in, fc_out); the backward two
  # per matmul (the gradients of both operands): 18 per kept block.
  cfg = TransformerConfig(**{**TINY, 'max_len': 16, 'causal': False})
  x = jax.ShapeDtypeStruct((4, 16, 16), jnp.float32)
  block_params = jax.eval_shape(Block(cfg).init, jax.random.key(0), x)
  forward_dots = jax.jit(lambda p, x: Block(cfg).apply(p, x, 2.0, True)).lower(
      block_params, x).as_text().count('stablehlo.dot_general')
  dots_N = [t.count('stablehlo.dot_general') for t in texts]
  assert forward_dots == 6
  assert dots_N == [dots_N[0] + 3 * forward_dots * n for n in range(L + 1)], dots_N
  # However long the run, its plans have at most L + 1 signatures: one program per N.
  config = _bert_config(**{'layerdrop.gamma': 0.01})
  plans = [layerdrop.METHOD.plan(config, t) for t in range(0, 2000, 4)]
  signatures = {programs.signature(p.model_kwargs) for p in plans}
  assert len(signatures) == len({p.metrics['layerdrop/layers_run'] for p in plans}) <= L + 1
  assert len(signatures) > 1


def _reference_stack(cfg, layers, x, ids, probs):
  """All L layers in order: a dropped one is the identity, a kept one
  h = x + Attn(LN1(x)) / p, out = h + FFN(LN2(h)) / p (PreLN, papers.md section 2)."""
  kept = dict(zip(ids, probs))
  for l in range(cfg.num_layers):
    if l not in kept:
      continue
    p = {k: jax.tree.map(lambda a: a[l], v) for k, v in layers.items()}
    ln = lambda name, y: nn.LayerNorm(dtype=cfg.dtype).apply({'params': p[name]}, y)
    h = x + Attention(cfg).apply({'params': p['attn']}, ln('ln1', x), True) / kept[l]
    x = h + MLP(cfg).apply({'params': p['mlp']}, ln('ln2', h), True) / kept[l]
  return x


@pytest.mark.parametrize('causal,kept', [(True, ((0, 2), (0.9, 0.6))),
                                         (False, ((0, 1, 2), (0.8, 0.7, 0.5)))])
def test_program_n_step_equals_full_model_with_identity_for_dropped_blocks(causal, kept):
  """The decoder LM (causal; kept blocks gathered by index) and the BERT masked LM (all
  kept: sliced): the loss and gradients of program N, which make its step, equal to float32
  rounding those of the reference stack; evaluation runs every block unscaled."""
  ids, probs = kept
  cfg = TransformerConfig(**TINY, causal=causal)
  model = TransformerLM(cfg) if causal else MaskedLM(cfg)
  tokens = _tokens()
  params = model.init(jax.random.key(1), tokens)['params']
  lm = lambda p: p if causal else p['encoder']   # the TransformerLM's params
  plan = dict(layer_ids_N=jnp.asarray(ids, jnp.int32), keep_probs_N=jnp.asarray(probs))

  def reference(p, ids, probs):
    bound = TransformerLM(cfg).bind({'params': lm(p)})
    x = _reference_stack(cfg, lm(p)['stack']['layers']['block'], bound.embed(tokens), ids,
                         probs)
    return bound.logits(x)

  def loss(logits_fn):
    def fn(p):
      logits = logits_fn(p)
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1).mean()
    return fn

  @jax.jit
  def steps(params, plan):
    program = loss(lambda p: model.apply({'params': p}, tokens, train=True, **plan))
    return (jax.value_and_grad(program)(params),
            jax.value_and_grad(loss(lambda p: reference(p, ids, probs)))(params),
            model.apply({'params': params}, tokens, train=False),
            reference(params, tuple(range(L)), (1.0,) * L))

  (loss_n, grads_n), (loss_r, grads_r), evaluated, full = steps(params, plan)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  close(loss_n, loss_r)
  jax.tree.map(close, grads_n, grads_r)
  close(evaluated, full)   # evaluation: every layer, unscaled
  dropped = [l for l in range(L) if l not in ids]
  for leaf in jax.tree.leaves(lm(grads_n)['stack']):
    np.testing.assert_array_equal(leaf[np.asarray(dropped, int)], 0.0)


def test_theta_bar_one_reproduces_baseline_bitwise():
  """theta_bar = 1 plans nothing: the baseline's very program (the same lowered text)."""
  texts = []
  for overrides in ({'layerdrop.enabled': False}, {'layerdrop.theta_bar': 1.0}):
    config = _bert_config(**overrides)
    task, trainer, state, batch = _built(config)
    plan = task.methods.plan(7)
    assert plan.model_kwargs == {}
    texts.append(trainer.train_step.lower(state, batch, {}).as_text())
  assert plan.metrics == {'layerdrop/theta': 1.0, 'layerdrop/layers_run': L}
  assert texts[0] == texts[1]


def test_stdloss_captures_the_kept_blocks_directly():
  """stdloss + layerdrop: the kept block's fc_in is captured with its value (no
  gradient-only layers); the dropped block's parameters get no gradient either way."""
  model = TransformerLM(TransformerConfig(**{**TINY, 'num_layers': 2}))
  tokens = _tokens()
  params = model.init(jax.random.key(0), tokens)
  config = _bert_config(**{'model.name': 'transformer_lm', 'model.num_layers': 2,
                           'stdloss.enabled': True, 'stdloss.layers': 'fc_in$',
                           'stdloss.weight': 0.5, 'stdloss.layer_metrics': True})
  plan = dict(layer_ids_N=jnp.array([0], jnp.int32), keep_probs_N=jnp.array([0.8]))
  apply = methods.Enabled(config).wrap_apply(model.apply)

  @jax.jit
  def grads(params):
    def f(p, weight):
      out, term, metrics = apply(p, tokens, train=True, **plan)
      return out.sum() + weight * term, metrics
    (_, metrics), on = jax.value_and_grad(f, has_aux=True)(params, 1.0)
    off = jax.grad(lambda p: f(p, 0.0)[0])(params)
    return metrics, on, off

  metrics, on, off = grads(params)
  assert metrics['stdloss/gradient_only_layers'] == 0
  key = 'stdloss/stack/layers/kept_0/mlp/fc_in/mean_var'
  assert key in metrics and not any('kept_1' in k or 'block_' in k for k in metrics)
  assert float(metrics['stdloss/loss']) > 0
  fc_in = lambda g: g['params']['stack']['layers']['block']['mlp']['fc_in']['kernel']
  assert not np.allclose(fc_in(on)[0], fc_in(off)[0])
  np.testing.assert_array_equal(fc_in(on)[1], 0.0)
  np.testing.assert_array_equal(fc_in(off)[1], 0.0)


def _train_rows(workdir):
  return {m['step']: {k: v for k, v in m.items() if k.startswith('train/')}
          for m in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}


def test_training_stops_and_resumes_bitwise_from_the_compilation_cache(tmp_path, caplog):
  """The decoder LM (2 blocks) with layer dropping by config: 4 steps straight; then the run
  stopped after its step-2 checkpoint (a copy of its workdir without the later one) and
  resumed logs the same metrics bitwise, loading its programs from JAX's persistent cache
  instead of compiling them. The FLOPs logged are those of program N."""
  num_layers = 2
  config = _bert_config(**{
      'model.name': 'transformer_lm', 'model.num_layers': num_layers,
      'total_steps': 4, 'log_every': 1, 'eval_every': 4, 'eval_steps': 1,
      'checkpoint_every': 2, 'layerdrop.gamma': 1.0,
      'compilation_cache': str(tmp_path / 'cache')})
  min_compile_s = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  try:
    straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
    shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
    shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '4')
    with caplog.at_level(logging.DEBUG, logger='jax._src.compiler'):
      resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_s)
    programs.use_compilation_cache(None)
  messages = [r.getMessage() for r in caplog.records if 'train_step' in r.getMessage()]
  assert any('cache hit' in m for m in messages), messages
  assert not any('CACHE MISS' in m for m in messages), messages

  assert _train_rows(str(tmp_path / 'straight')) == _train_rows(str(tmp_path / 'resumed'))
  assert straight['eval/loss'] == resumed['eval/loss']
  logged = read_jsonl(str(tmp_path / 'straight' / 'metrics.jsonl'))
  layers_run = [m['train/layerdrop/layers_run'] for m in logged]
  assert layers_run[0] == num_layers and min(layers_run) < num_layers
  assert max(m['perf/programs'] for m in logged) <= num_layers + 1
  flops_of = {}
  for m in logged:   # one cost per program, growing with the blocks it runs
    assert flops_of.setdefault(m['train/layerdrop/layers_run'], m['perf/flops_per_step']) \
        == m['perf/flops_per_step']
  by_n = [flops_of[n] for n in sorted(flops_of)]
  assert by_n == sorted(by_n) and len(set(by_n)) == len(by_n)
  for m in logged:   # metrics logged at step s are those of step index s - 1
    plan = layerdrop.METHOD.plan(config, m['step'] - 1)
    assert m['train/layerdrop/layers_run'] == len(plan.model_kwargs['layer_ids_N'])
    np.testing.assert_allclose(m['train/layerdrop/theta'],
                               0.5 * np.exp(-1.0 * (m['step'] - 1)) + 0.5, rtol=1e-6)
