"""The method interface: enabled methods composed, checked together, refused by pair."""
import jax.numpy as jnp
import numpy as np
import pytest

from accel import config_lib, methods
from accel.errors import UserError
from accel.method import Method, StepPlan


class _Scaled(Method):
  """A test method: doubles the outputs, adds aux loss 1 + its name's length, plans an array."""
  layouts = ('data_parallel', 'pipeline')

  def __init__(self, block):
    self.block = block

  def enabled(self, config):
    return True

  def wrap_apply(self, config, apply_fn):
    def wrapped(*args, **kwargs):
      return 2 * apply_fn(*args, **kwargs), 1.0 + len(self.block), {f'{self.block}/m': 1.0}
    return wrapped

  def plan(self, config, step):
    return StepPlan({f'{self.block}_L': np.full(step, 1)}, {f'{self.block}/step': step})


def test_hooks_compose_in_order_and_terms_add_up():
  enabled = methods.Enabled(config_lib.base_config(), (_Scaled('a'), _Scaled('bb')))
  outputs, aux, metrics = enabled.wrap_apply(lambda x: x + 1)(jnp.float32(1))
  assert float(outputs) == 8.0                      # (1 + 1) * 2 * 2
  assert aux == (1 + 1) + (1 + 2)
  assert metrics == {'a/m': 1.0, 'bb/m': 1.0}
  plan = enabled.plan(3)
  assert sorted(plan.model_kwargs) == ['a_L', 'bb_L'] and plan.metrics == {'a/step': 3,
                                                                          'bb/step': 3}
  with pytest.raises(ValueError, match='same model inputs'):
    methods.Enabled(config_lib.base_config(), (_Scaled('a'), _Scaled('a'))).plan(1)


def test_none_enabled_is_the_plain_model():
  enabled = methods.Enabled(config_lib.base_config())
  assert enabled.names == () and enabled.layout == 'data_parallel'
  assert enabled.wrap_apply(lambda x: x)(3) == (3, 0.0, {})
  assert enabled.plan(5) == StepPlan()


def test_refusals_name_the_pair_or_the_model():
  c = config_lib.base_config()
  c.pipeline.enabled = c.layerdrop.enabled = True
  with pytest.raises(UserError, match='pipeline.enabled does not compose with layerdrop'):
    methods.Enabled(c)
  c = config_lib.base_config()
  c.model.name, c.layerdrop.enabled = 'transformer_xl', True
  with pytest.raises(UserError, match='layerdrop.enabled supports model.name in'):
    methods.Enabled(c)
  c = config_lib.base_config()
  c.model.name, c.lowprec.enabled = 'transformer_xl', True
  with pytest.raises(UserError, match='lowprec.enabled supports model.name in'):
    methods.Enabled(c)


def test_every_listed_method_has_a_config_block():
  c = config_lib.base_config()
  for m in methods.METHODS:
    assert 'enabled' in c[m.block] and c[m.block].enabled is False, m.block
