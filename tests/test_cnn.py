"""Tests for accel.models.cnn: shapes, norm choice, batch statistics, injected numerics."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from accel.models import cnn


def _init(model, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  return x, model.init(jax.random.key(1), x)


@pytest.mark.parametrize('name,shape', [
    ('cnn', (2, 8, 8, 1)), ('cnn', (2, 28, 28, 1)), ('mlp', (2, 8, 8, 1)),
    ('resnet', (2, 32, 32, 3)), ('resnet', (2, 8, 8, 1))])
def test_output_shape_and_param_shapes(name, shape):
  model = cnn.MODELS[name](num_classes=7, norm='none')
  x, variables = _init(model, shape)
  logits = model.apply(variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  params = variables['params']
  assert params['logits']['kernel'].shape[-1] == 7
  if name == 'cnn':  # 3 conv layers 32/16/8, 5x5, stride 2 -> H/8 x W/8 x 8 into logits
    assert [params[f'conv_{i}']['kernel'].shape for i in range(3)] == [
        (5, 5, shape[-1], 32), (5, 5, 32, 16), (5, 5, 16, 8)]
    assert params['logits']['kernel'].shape[0] == -(-shape[1] // 8) * -(-shape[2] // 8) * 8
  if name == 'mlp':
    assert [params[f'dense_{i}']['kernel'].shape for i in range(3)] == [
        (64, 100), (100, 100), (100, 100)]


def test_resnet_depth_counts_convs():
  # ResNet-20: 1 stem + 3 stages * 3 blocks * 2 convs = 19 convs, + 2 projections.
  model = cnn.ResNet(depth=20, width=1)
  _, variables = _init(model, (1, 8, 8, 3))
  names = list(variables['params'])
  assert sum(n.endswith(('_conv', '_conv0', '_conv1')) for n in names) == 19
  assert sum(n.endswith('_proj') for n in names) == 2
  assert variables['params']['stage2_block0_conv0']['kernel'].shape == (3, 3, 32, 64)
  with pytest.raises(ValueError, match='6n\\+2'):
    cnn.ResNet(depth=21).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_norm_choice_changes_parameter_tree():
  trees = {}
  for norm in cnn.NORMS:
    _, variables = _init(cnn.ConvNet(norm=norm, num_groups=2), (2, 8, 8, 1))
    trees[norm] = variables
  assert 'norm_0' not in trees['none']['params']
  assert 'bias' in trees['none']['params']['conv_0']
  for norm in ('batch', 'group', 'layer'):
    assert set(trees[norm]['params']['norm_0']) == {'scale', 'bias'}
    assert 'bias' not in trees[norm]['params']['conv_0']
  assert set(trees['batch']) == {'params', 'batch_stats'}
  assert set(trees['group']) == set(trees['layer']) == {'params'}
  with pytest.raises(ValueError, match='norm must be one of'):
    _init(cnn.ConvNet(norm='weight'), (2, 8, 8, 1))


def test_group_and_layer_norm_statistics():
  # Pre-relu outputs of the first conv after group / layer norm (scale 1, bias 0 at init):
  # zero mean, unit variance per (example, group) / per example over (H, W, C).
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  for norm, groups in (('group', 4), ('layer', 1)):
    model = cnn.ConvNet(norm=norm, num_groups=4, features=(8,))
    variables = model.init(jax.random.key(1), x)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable='intermediates')
    y = np.asarray(state['intermediates']['norm_0']['__call__'][0])
    y = y.reshape(2, -1, groups, 8 // groups).transpose(0, 2, 1, 3).reshape(2, groups, -1)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-3)


def test_batch_stats_updated_only_in_train():
  model = cnn.ResNet(depth=8, norm='batch')
  x, variables = _init(model, (4, 8, 8, 3))
  x = 3.0 + 2.0 * x
  eval_logits = model.apply(variables, x, train=False)  # no mutable: must not need to write
  _, eval_updates = model.apply(variables, x, train=False, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, eval_updates,
               {'batch_stats': variables['batch_stats']})
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  old = variables['batch_stats']['stem_norm']
  new = updates['batch_stats']['stem_norm']
  # Running mean starts at 0 and moves by (1 - momentum) toward the batch mean.
  assert not np.allclose(new['mean'], old['mean'])
  pre = model.apply(variables, x, capture_intermediates=True, train=True,
                    mutable=['intermediates', 'batch_stats']
                    )[1]['intermediates']['stem_conv']['__call__'][0]
  np.testing.assert_allclose(new['mean'], 0.1 * pre.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Training normalizes with the batch moments, evaluation with the (initial) running ones.
  assert not np.allclose(logits, eval_logits)


def test_injected_dot_general_and_conv_are_called():
  calls = {'dot': 0, 'conv': 0}

  def dot(*args, **kwargs):
    calls['dot'] += 1
    return lax.dot_general(*args, **kwargs)

  def conv(*args, **kwargs):
    calls['conv'] += 1
    return 2.0 * lax.conv_general_dilated(*args, **kwargs)

  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  plain = cnn.ConvNet(norm='none')
  variables = plain.init(jax.random.key(1), x)
  injected = cnn.ConvNet(norm='none', dot_general=dot, conv_general_dilated=conv)
  out = injected.apply(variables, x)
  assert calls == {'dot': 1, 'conv': 3}
  assert not np.allclose(out, plain.apply(variables, x))  # the doubled convs took effect
  cnn.MLP(dot_general=dot).init(jax.random.key(1), x)
  assert calls['dot'] == 1 + 4


def test_group_norm_refuses_single_value_groups():
  # 8x8 input -> the third stride-2 conv gives 1x1x8: 8 groups would each hold one value.
  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match='single values'):
    jax.eval_shape(cnn.ConvNet(norm='group', num_groups=8).init, jax.random.key(0), x)
  jax.eval_shape(cnn.ConvNet(norm='group', num_groups=2).init, jax.random.key(0), x)
