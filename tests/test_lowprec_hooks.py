"""config.lowprec -> model hooks, optimizer wrapper, loss scale (the method's hooks)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from accel import config_lib, methods
from accel.errors import UserError
from accel.lowprec import formats as F
from accel.lowprec import gemm as G
from accel.lowprec.method import METHOD as lowprec
from configs import fp8_lm, fp8_resnet


def test_disabled_changes_nothing():
  enabled = methods.Enabled(config_lib.base_config())
  tx = optax.sgd(0.1)
  assert enabled.model_overrides() == {} and enabled.wrap_optimizer(tx) is tx
  x = jnp.ones(3)
  assert enabled.transform_outputs(x) is x


def test_variants_set_the_three_gemms_and_exemptions():
  c = fp8_lm.get_config('smoke,fp8_chunk1')
  ov = lowprec.model_overrides(c)
  assert ov['head_dot_general'] is lax.dot_general
  s = ov['dot_general'].settings
  assert [g.chunk_size for g in (s.fwd, s.bwd_data, s.bwd_weight)] == [1, 1, 1]
  assert s.fwd == G.GemmSettings('e5m2', 'e6m9', 'fp32', 1, 'fast', 'nearest', 'auto')
  r = fp8_resnet.get_config('smoke,fp8')
  ov = lowprec.model_overrides(r)
  assert ov['first_conv_general_dilated'] is lax.conv_general_dilated
  assert ov['logits_dot_general'] is lax.dot_general
  assert isinstance(ov['conv_general_dilated'], G.LowPrecConv)
  r.lowprec.exempt_first_last = False
  assert isinstance(lowprec.model_overrides(r)['logits_dot_general'], G.LowPrecDotGeneral)
  assert fp8_lm.get_config('cpu,fp32').lowprec.enabled is False
  assert fp8_lm.get_config('cpu,fp8_nearest').lowprec.update_rounding == 'nearest'
  with pytest.raises(ValueError):
    fp8_lm.get_config('cpu,fp16')


def test_bad_format_is_a_user_error():
  c = fp8_lm.get_config('smoke')
  c.lowprec.fwd.acc_fmt = 'e7m8'
  with pytest.raises(UserError):
    methods.Enabled(c)


def test_convnet_with_hooks_takes_one_step_in_e6m9():
  from accel.models.cnn import ConvNet
  c = fp8_resnet.get_config('smoke')
  net = lambda **hk: ConvNet(features=(4, 4), kernel_size=3, **hk)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)), jnp.float32)
  labels = jnp.arange(4)
  params = lowprec.init_variables(c, net().init(jax.random.key(0), x))['params']
  model = net(**lowprec.model_overrides(c))

  def loss(p):
    logits = lowprec.transform_outputs(c, model.apply({'params': p}, x))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  tx = lowprec.wrap_optimizer(c, optax.sgd(0.1))
  grads = jax.jit(jax.grad(loss))(params)
  step = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))
  new = step(params, grads)
  for leaf in jax.tree.leaves(new):
    assert bool(jnp.all(F.is_representable(leaf, F.E6M9)))
  assert not jnp.array_equal(new['conv_1']['kernel'], params['conv_1']['kernel'])
  # the loss scale reached the gradients and only them
  g_ref = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      net().apply({'params': p}, x), labels).mean()))(params)
  ratio = jnp.linalg.norm(grads['logits']['kernel']) / jnp.linalg.norm(g_ref['logits']['kernel'])
  assert abs(float(ratio) / c.lowprec.loss_scale - 1) < 0.05


def test_auto_impl_takes_the_kernels_only_on_a_gpu_where_they_apply():
  fast = G.GemmSettings('e5m2', 'e6m9', 'fp32', 1, 'fast', 'nearest', 'auto')
  assert G._kernels_support(fast)
  assert not G._kernels_support(dataclasses.replace(fast, rounding='stochastic'))
  assert not G._kernels_support(dataclasses.replace(fast, operand_fmt='fp32'))
  a = jnp.ones((8, 16), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda x, w: G._gemm(x, w, G._MATMUL, fast, 0, 0))(a, a.T))
  assert jax.default_backend() != 'cpu' or 'pallas_call' not in jaxpr
