"""Tests for accel.stdloss: the formula, its gradient, layer capture, data-parallel moments."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from accel import methods, stdloss
from accel.models import cnn


def _reference(x, axes, eps=stdloss.EPS):
  """The paper's formula in float64 numpy (sigma^2 -> sigma^2 + eps)."""
  x = np.asarray(x, np.float64)
  mu = x.mean(axis=axes)
  v = x.var(axis=axes) + eps
  return 0.5 * np.sum(mu ** 2 + v - np.log(v) - 1)


@pytest.mark.parametrize('shape,axes', [((64, 5), (0,)), ((8, 4, 4, 3), (0, 1, 2)),
                                        ((4, 6, 3), (0, 1))])
def test_formula_on_random_data(shape, axes):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  c = shape[-1]
  x = (jax.random.uniform(k1, (c,), minval=-2, maxval=2)
       + jax.random.uniform(k2, (c,), minval=0.1, maxval=3) * jax.random.normal(k3, shape))
  got = jax.jit(stdloss.standardization_loss, static_argnums=1)(x, axes)
  np.testing.assert_allclose(got, _reference(x, axes), rtol=1e-5)
  assert got > 1.0  # far from standardized: the test data is not trivially 0


def test_zero_for_standardized_inputs():
  x = np.random.default_rng(0).normal(3.0, 5.0, size=(32, 4, 4, 6))
  x = (x - x.mean((0, 1, 2))) / x.std((0, 1, 2))
  # Exactly: 1/2 * C * (eps - log(1 + eps)) ~= C * eps^2 / 4.
  assert abs(float(stdloss.standardization_loss(jnp.asarray(x, jnp.float32)))) < 1e-6


def test_near_zero_variance_is_finite():
  x = jnp.concatenate([jnp.full((16, 1), 0.5), jax.random.normal(jax.random.key(0), (16, 1))], 1)
  (loss, grad), loss_bf16 = jax.jit(lambda x: (
      jax.value_and_grad(stdloss.standardization_loss)(x),
      stdloss.standardization_loss(x.astype(jnp.bfloat16))))(x)
  expected_const = 0.5 * (0.25 + stdloss.EPS - np.log(stdloss.EPS) - 1)
  np.testing.assert_allclose(loss, expected_const + _reference(x[:, 1:], (0,)), rtol=1e-5)
  assert np.all(np.isfinite(grad))
  # bf16 activations: moments in float32, loss float32.
  assert loss_bf16.dtype == jnp.float32


def _two_pass_loss(x, axes, num_shards=1, eps=stdloss.EPS):
  """The formula as it was before the one-pass moments: mean, then mean((x - mu)^2)."""
  x = x.astype(jnp.float32)
  x = x.reshape(num_shards, x.shape[0] // num_shards, *x.shape[1:])
  axes = tuple(a + 1 for a in axes)
  mu = x.mean(axes, keepdims=True)
  v = jnp.square(x - mu).mean(axes) + eps
  return jnp.mean(0.5 * jnp.sum(jnp.square(mu.squeeze(axes)) + v - jnp.log(v) - 1,
                                axis=tuple(range(1, v.ndim))))


def test_one_pass_moments_equal_the_two_pass_formula():
  """Value and gradient as the two-pass formula's to float32 rounding, also for channels
  whose mean is far from 0 relative to their spread and for bfloat16 activations; and
  the activation is read by exactly 2 reductions in the forward and none in the backward
  (the two-pass form's backward reduces once more, through mu)."""
  k1, k2 = jax.random.split(jax.random.key(3))
  offset = jnp.array([0.0, -3.0, 40.0, 1e3])
  x = offset + jnp.array([1.0, 0.2, 2.0, 5.0]) * jax.random.normal(k1, (16, 3, 3, 4))
  for dtype, num_shards in ((jnp.float32, 4), (jnp.bfloat16, 1)):
    both = jax.jit(lambda x: (  # pylint: disable=cell-var-from-loop
        jax.value_and_grad(stdloss.standardization_loss)(x, (0, 1, 2), num_shards=num_shards),
        jax.value_and_grad(_two_pass_loss)(x, (0, 1, 2), num_shards)))
    (l_new, g_new), (l_old, g_old) = both(x.astype(dtype))
    np.testing.assert_allclose(l_new, l_old, rtol=2e-6)
    np.testing.assert_allclose(g_new.astype(jnp.float32), g_old.astype(jnp.float32),
                               rtol=1e-5, atol=1e-6 * float(jnp.abs(g_old).max()))

  def full_size_reductions(fn):
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(x).jaxpr
    return sum(e.primitive.name == 'reduce_sum' and e.invars[0].aval.size == x.size
               for e in jaxpr.eqns)
  assert full_size_reductions(lambda x: stdloss.standardization_loss(x)) == 2
  assert full_size_reductions(lambda x: _two_pass_loss(x, (0, 1, 2))) == 3


def test_variance_is_never_negative_nor_cancelled():
  """E[x^2] - E[x]^2 in float32 cancels to noise (or below 0) for a channel far from 0;
  the shifted sums do not: a constant channel has sigma^2 = 0 exactly and a channel of
  1e6 + small steps has the float64 variance of its float32 values."""
  steps = jnp.array([0.0, 0.0625, 0.125, 0.0625] * 8)
  x = jnp.stack([jnp.full(32, 1234.5678), 1e6 + steps, 1e6 - steps], 1)
  _, var = stdloss._moments(x, (0,), 1, None)
  ref = np.asarray(x, np.float64).var(0)
  assert ref[0] == 0 and var[0, 0] == 0
  np.testing.assert_allclose(var[0, 1:], ref[1:], rtol=1e-6)
  naive = jnp.mean(jnp.square(x), 0) - jnp.square(jnp.mean(x, 0))
  assert np.abs(naive[1:] - ref[1:]).max() > 10 * ref[1]   # what the shift avoids


def test_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (6, 3, 2), jnp.float64) * 2.0 + 0.5
    # jitted: check_grads evaluates f at many points of one shape (eager, each op compiles)
    f = jax.jit(lambda x: stdloss.standardization_loss(x, (0, 1)))
    test_util.check_grads(f, (x,), order=1, modes=['rev'], eps=1e-4, atol=1e-6, rtol=1e-6)
    g = jax.jit(lambda x: stdloss.standardization_loss(x, (0,), num_shards=3))
    test_util.check_grads(g, (x,), order=1, modes=['rev'], eps=1e-4, atol=1e-6, rtol=1e-6)


def _model_and_vars(model, shape=(8, 8, 8, 1)):
  x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 1.0
  return x, jax.jit(model.init)(jax.random.key(1), x)


def test_capture_takes_exactly_the_named_layers():
  model = cnn.ConvNet()
  x, variables = _model_and_vars(model)
  _, captured = jax.jit(stdloss.capture(model.apply))(variables, x)
  assert list(captured) == ['conv_0', 'conv_1', 'conv_2']  # not the 'logits' classifier
  _, inter = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                              mutable='intermediates'))(variables, x)
  for name, s in captured.items():
    y = inter['intermediates'][name]['__call__'][0]
    np.testing.assert_allclose(s.loss, _reference(y, (0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(s.mean_abs_mu, np.abs(y.mean((0, 1, 2))).mean(), rtol=1e-5)
    np.testing.assert_allclose(s.mean_var, y.var((0, 1, 2)).mean(), rtol=1e-5)
  np.testing.assert_allclose(stdloss.total_loss(captured),
                             sum(float(s.loss) for s in captured.values()), rtol=1e-6)

  _, only = jax.eval_shape(stdloss.capture(model.apply, layers='conv_1$'), variables, x)
  assert list(only) == ['conv_1']
  _, all_dense_conv = jax.eval_shape(stdloss.capture(model.apply, exclude=''), variables, x)
  assert list(all_dense_conv) == ['conv_0', 'conv_1', 'conv_2', 'logits']

  # Layer identity only needs shapes: trace without compiling.
  def captured_names(model):
    variables = jax.eval_shape(model.init, jax.random.key(1), x)
    return list(jax.eval_shape(stdloss.capture(model.apply), variables, x)[1])

  assert captured_names(cnn.MLP(norm='batch')) == ['dense_0', 'dense_1', 'dense_2']
  resnet_names = captured_names(cnn.ResNet(depth=8))
  assert len(resnet_names) == 1 + 3 * 2 + 2  # stem, 2 convs per block, 2 projections
  assert 'stage1_block0_proj' in resnet_names and 'logits' not in resnet_names


def test_capture_changes_nothing_bitwise():
  model = cnn.ConvNet()
  x, variables = _model_and_vars(model)
  plain = jax.jit(model.apply)(variables, x)
  captured_fn = jax.jit(lambda v, x: stdloss.capture(model.apply)(v, x)[0])
  np.testing.assert_array_equal(captured_fn(variables, x), plain)
  # Gradients of the task loss alone are untouched by the capture too.
  task = lambda v, f: f(v, x).sum()
  g_plain = jax.jit(jax.grad(lambda v: task(v, model.apply)))(variables)
  g_capt = jax.jit(jax.grad(lambda v: task(v, lambda *a: stdloss.capture(model.apply)(*a)[0])))(
      variables)
  jax.tree.map(np.testing.assert_array_equal, g_capt, g_plain)


def test_metrics_names():
  model = cnn.MLP(features=(4,))
  x, variables = _model_and_vars(model)
  m = jax.eval_shape(lambda v, x: stdloss.metrics(stdloss.capture(model.apply)(v, x)[1]),
                     variables, x)
  assert set(m) == {'stdloss/loss', 'stdloss/mean_abs_mu', 'stdloss/mean_var'}
  m = jax.eval_shape(lambda v, x: stdloss.metrics(stdloss.capture(model.apply)(v, x)[1],
                                                  per_layer=True), variables, x)
  assert set(m) == {'stdloss/loss', 'stdloss/mean_abs_mu', 'stdloss/mean_var',
                    'stdloss/dense_0/mean_abs_mu', 'stdloss/dense_0/mean_var'}


_MULTI_DEVICE = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from accel import methods, stdloss
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ('data',))
    x = jax.random.normal(jax.random.key(0), (16, 3, 3, 5)) * 2 + 1
    x = x + jnp.arange(16.0)[:, None, None, None]  # each device's slice has other moments
    x = jax.device_put(x, NamedSharding(mesh, P('data')))

    def ref(a):
      a = np.asarray(a, np.float64)
      mu, v = a.mean((0, 1, 2)), a.var((0, 1, 2)) + stdloss.EPS
      return 0.5 * np.sum(mu ** 2 + v - np.log(v) - 1)

    glob = jax.jit(lambda x: stdloss.standardization_loss(x))(x)
    per_dev = jax.jit(lambda x: stdloss.standardization_loss(x, num_shards=4))(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.device for s in shards] == list(mesh.devices)
    np.testing.assert_allclose(glob, ref(x), rtol=1e-5)
    np.testing.assert_allclose(per_dev, np.mean([ref(s.data) for s in shards]), rtol=1e-5)
    assert abs(per_dev - glob) > 1.0, (per_dev, glob)  # the two really differ here

    def in_shard_map(axis_name):
      def f(xl):
        l = stdloss.standardization_loss(xl, axis_name=axis_name)
        return jax.lax.pmean(l, 'data')
      return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P('data'), out_specs=P()))(x)
    np.testing.assert_allclose(in_shard_map('data'), glob, rtol=1e-5)
    np.testing.assert_allclose(in_shard_map(None), per_dev, rtol=1e-5)

    # Per-device gradient wrt x: each device's slice only sees its own moments.
    g = jax.jit(jax.grad(lambda x: stdloss.standardization_loss(x, num_shards=4)))(x)
    g0 = jax.grad(lambda a: stdloss.standardization_loss(a) / 4)(np.asarray(shards[0].data))
    np.testing.assert_allclose(np.asarray(g)[:4], g0, rtol=1e-4, atol=1e-7)
    print('OK')
''')


def test_per_device_vs_global_moments_on_4_devices():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='4', JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                       env.get('PYTHONPATH', '')])
  proc = subprocess.run([sys.executable, '-c', _MULTI_DEVICE], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == 'OK', proc.stderr[-3000:]


def _hook_config(**stdloss_overrides):
  from accel import config_lib
  c = config_lib.base_config()
  c.stdloss.update(stdloss_overrides)
  return c


def _hook(cfg, apply_fn):
  """The training apply the enabled methods of `cfg` make of `apply_fn`."""
  return methods.Enabled(cfg).wrap_apply(apply_fn)


def test_training_apply_adds_weighted_term():
  model = cnn.ConvNet()
  x, variables = _model_and_vars(model)
  plain = model.apply(variables, x)
  on = _hook_config(enabled=True, weight=0.25, layer_metrics=True)
  out, term, m = jax.jit(_hook(on, model.apply))(variables, x)
  np.testing.assert_array_equal(out, plain)
  np.testing.assert_allclose(term, 0.25 * m['stdloss/loss'], rtol=1e-6)
  assert float(m['stdloss/loss']) > 0 and 'stdloss/conv_2/mean_var' in m
  # Disabled: the plain apply, no term, no metrics (evaluation: test_classification_task_wiring).
  out, term, m = _hook(_hook_config(enabled=False), model.apply)(variables, x)
  np.testing.assert_array_equal(out, plain)
  assert term == 0.0 and m == {}


def test_bad_layer_choice_is_refused():
  from accel.errors import UserError
  model = cnn.ConvNet()
  x = jnp.zeros((2, 8, 8, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(UserError, match='matches no Dense or Conv'):
    jax.eval_shape(_hook(_hook_config(enabled=True, layers='fc_in'), model.apply), variables, x)
  with pytest.raises(UserError, match='bad regular expression'):
    methods.Enabled(_hook_config(enabled=True, layers='('))
  with pytest.raises(UserError, match='per_device'):
    methods.Enabled(_hook_config(enabled=True, moments='local'))


def test_classification_task_wiring():
  """Task.loss adds lambda * L_std in training; disabled it is bitwise the plain task;
  evaluation ignores it; batch statistics are untouched by the capture."""
  from accel import tasks
  x, _ = _model_and_vars(cnn.ConvNet())
  batch = {'image': x, 'label': jnp.arange(8) % 10}
  rng = jax.random.key(2)

  model = cnn.ConvNet(norm='batch')  # the batch_stats path every ClassificationTask takes

  def task_for(**stdloss_cfg):
    cfg = _hook_config(**stdloss_cfg)
    return tasks.ClassificationTask(cfg, model, methods.Enabled(cfg),
                                    mutable_collections=('batch_stats',))

  off, on = task_for(enabled=False), task_for(enabled=True, weight=0.5)
  variables = off.init(jax.random.key(1), batch)
  params = variables.pop('params')
  loss_grad = lambda t: jax.jit(jax.value_and_grad(t.loss, has_aux=True),
                                static_argnums=4)(params, variables, batch, rng, True)
  (l_off, (m_off, mut_off)), g_off = loss_grad(off)
  (l_on, (m_on, mut_on)), _ = loss_grad(on)
  # Reference: the plain model apply and the task's own objective, no Task.apply machinery.
  ce = lambda p: off.objective(
      model.apply({'params': p, **variables}, x, train=True, mutable=['batch_stats'])[0],
      batch)[0]
  ce, g_plain = jax.jit(jax.value_and_grad(ce))(params)
  np.testing.assert_array_equal(l_off, ce)
  np.testing.assert_allclose(l_on, ce + 0.5 * m_on['stdloss/loss'], rtol=1e-6)
  assert not any(k.startswith('stdloss/') for k in m_off)
  jax.tree.map(np.testing.assert_array_equal, mut_on, mut_off)
  # Disabled is bitwise the task without the hook: grads of the plain CE.
  jax.tree.map(np.testing.assert_array_equal, g_off, g_plain)
  e_off, e_on = (jax.jit(t.evaluate)(params, variables, batch) for t in (off, on))
  assert set(e_on) == set(e_off) == {'loss', 'accuracy'}
  jax.tree.map(np.testing.assert_array_equal, e_on, e_off)


def test_configs_choose_the_variant_by_one_argument():
  from configs import stdloss_mnist, stdloss_resnet
  c = stdloss_mnist.get_config('smoke,mlp,stdloss')
  assert (c.model.name, c.model.norm, c.stdloss.enabled) == ('mlp', 'none', True)
  c = stdloss_mnist.get_config('cpu,batch')
  assert (c.model.name, c.model.norm, c.stdloss.enabled) == ('cnn', 'batch', False)
  assert (c.total_steps, c.batch_size, c.optimizer.lr, c.optimizer.weight_decay,
          c.optimizer.momentum, c.stdloss.weight) == (1000, 128, 1e-3, 4e-5, 0.0, 1.0)
  c = stdloss_resnet.get_config('smoke,group')
  assert (c.model.name, c.model.norm, c.model.depth) == ('resnet', 'group', 8)
  for bad in ('cpu,cnn,mlp,batch', 'cpu,foo', 'gpu'):
    with pytest.raises(ValueError, match='bad config argument'):
      stdloss_mnist.get_config(bad)


def test_lifted_layers_get_the_gradient_of_the_term():
  """Layers inside nn.remat: no value leaves the transform, but the parameters get exactly
  the gradient of weight * L. (Layer dropping's kept blocks are captured directly:
  tests/test_layerdrop.py.)"""
  import flax.linen as nn

  class RematNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.remat(cnn.ConvNet)(name='net')(x)

  x, variables = _model_and_vars(cnn.ConvNet())
  params = variables['params']
  hook = _hook(_hook_config(enabled=True, weight=0.5), RematNet().apply)

  def lifted(p):
    out, term, m = hook({'params': {'net': p}}, x)
    return out.sum() + term, m

  def reference(p):
    out, captured = stdloss.capture(cnn.ConvNet().apply)({'params': p}, x)
    return out.sum() + 0.5 * stdloss.total_loss(captured)

  (_, m), g_lifted = jax.jit(jax.value_and_grad(lifted, has_aux=True))(params)
  g_ref = jax.jit(jax.grad(reference))(params)
  g_task_only = jax.jit(jax.grad(lambda p: cnn.ConvNet().apply({'params': p}, x).sum()))(params)
  assert m['stdloss/gradient_only_layers'] == 3 and m['stdloss/loss'] == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               g_lifted, g_ref)
  assert not np.allclose(g_ref['conv_0']['kernel'], g_task_only['conv_0']['kernel'])
  with pytest.raises(stdloss.LiftedLayerError, match='net/conv_0 runs inside a lifted'):
    jax.eval_shape(stdloss.capture(RematNet().apply), {'params': {'net': params}}, x)
