"""The Transformer's speed options change how it computes, not what: qkv_projection,
use_bias, remat_policy, gelu_recompute, position_lookup (accel/models/transformer.py)."""
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from accel import config_lib, models
from accel.data.input_pipeline import DatasetInfo
from accel.errors import UserError

TOKENS = jnp.arange(24).reshape(2, 12) % 16


def _model(**model_overrides):
  c = config_lib.base_config()
  c.model.update(num_layers=2, d_model=16, num_heads=2, d_ff=32, **model_overrides)
  c.data.seq_len = 12
  return models.build_model(c, DatasetInfo('lm', vocab_size=16))


def _fused_as_split(params):
  """The fused model's parameters with each block's qkv cut into query, key, value (the
  blocks' parameters are stacked: leading layer axis)."""
  def split_block(block):
    qkv = block['attn']['qkv']
    parts = zip(('query', 'key', 'value'), jnp.split(qkv['kernel'], 3, axis=-1),
                jnp.split(qkv['bias'], 3, axis=-1))
    attn = {k: v for k, v in block['attn'].items() if k != 'qkv'}
    attn.update({part: {'kernel': kernel, 'bias': bias} for part, kernel, bias in parts})
    return {**block, 'attn': attn}
  blocks = params['stack']['layers']['block']
  return {**params, 'stack': {'layers': {'block': split_block(blocks)}}}


@pytest.fixture(scope='module')
def params():
  """The default model's parameters, shared by the tests (one init compile)."""
  return jax.jit(_model().init)(jax.random.key(0), TOKENS)['params']


def test_split_qkv_is_the_fused_projection_cut_in_three(params):
  fused, split = _model(), _model(qkv_projection='split')
  split_shapes = jax.eval_shape(split.init, jax.random.key(0), TOKENS)['params']
  as_split = _fused_as_split(params)
  assert (jax.tree.map(lambda x: x.shape, as_split)
          == jax.tree.map(lambda x: x.shape, split_shapes))
  np.testing.assert_allclose(jax.jit(split.apply)({'params': as_split}, TOKENS),
                             jax.jit(fused.apply)({'params': params}, TOKENS),
                             rtol=1e-5, atol=1e-5)


def test_bias_free_and_rematerialized_blocks(params):
  with_bias = jax.eval_shape(_model().init, jax.random.key(0), TOKENS)['params']
  no_bias = jax.eval_shape(_model(use_bias=False).init, jax.random.key(0), TOKENS)['params']
  paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in
                        jax.tree_util.tree_flatten_with_path(tree)[0]}
  removed = paths(with_bias) - paths(no_bias)
  # the blocks' (stacked: one leaf per kind): 4 Dense + 2 LayerNorm biases; the final LN's
  assert len(removed) == 6 + 1 and all(p.endswith("['bias']") for p in removed)
  assert not paths(no_bias) - paths(with_bias)

  plain = _model()
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.square(m.apply({'params': p}, TOKENS)).mean()))(params)
  value, grads = loss(plain)
  same_values = (dict(remat=True, remat_policy='dots'), dict(gelu_recompute=True),
                 dict(position_lookup='gather'))
  for options in same_values:
    r_value, r_grads = loss(_model(**options))
    np.testing.assert_allclose(r_value, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 r_grads, grads)
  for bad in (dict(remat_policy='everything'), dict(qkv_projection='packed'),
              dict(position_lookup='sinusoid')):
    with pytest.raises(UserError, match=f'unknown model.{next(iter(bad))}'):
      _model(**bad)


def test_gelu_recompute_keeps_the_matmul_output_not_the_tanh(params, capsys):
  """What the backward reads: the plain MLP saves the GELU's tanh (a B x L x F tensor per
  block), gelu_recompute saves only what the matmul computed."""
  def saved(model):
    ad_checkpoint.print_saved_residuals(
        lambda p: jnp.square(model.apply({'params': p}, TOKENS)).mean(), params)
    return capsys.readouterr().out
  assert 'output of tanh' in saved(_model())
  recomputed = saved(_model(gelu_recompute=True))
  assert 'output of tanh' not in recomputed and 'output of dot_general' in recomputed


def test_train_accuracy_off_leaves_the_loss_and_evaluation():
  from accel import tasks
  c = config_lib.base_config()
  c.train_accuracy = False
  logits = jax.random.normal(jax.random.key(1), (2, 12, 16))
  task = tasks.LanguageModelTask(c, None, None)
  loss, train_metrics = jax.jit(task.train_objective)(logits, {'targets': TOKENS})
  eval_loss, eval_metrics = jax.jit(task.objective)(logits, {'targets': TOKENS})
  assert 'accuracy' not in train_metrics and 'accuracy' in eval_metrics
  np.testing.assert_allclose(loss, eval_loss, rtol=1e-6)
