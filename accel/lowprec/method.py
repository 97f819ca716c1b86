"""The low-precision method: `config.lowprec.*` -> model hooks, optimizer wrapper, loss scale.

Block (accel/config_lib.py): enabled; fwd / bwd_data / bwd_weight, each with operand_fmt,
acc_fmt, mul_fmt, chunk_size, mode, rounding, impl (`gemm.GemmSettings`); exempt_first_last (the
first and last layers keep float32 GEMMs: the LM's output projection, a classifier's first
conv and its logits layer; the LM's first layer is an embedding lookup, no GEMM);
update_fmt / update_rounding (weights, gradients and optimizer state, `optimizer.py`;
'fp32' keeps the ordinary float32 update); loss_scale; seed.

Under the Ouroboros pipeline: the GEMM hooks are in the model config its pieces run; the
initial rounding acts on the model's params before they are cut into stages; the loss
scale on the head's outputs (`accel.pipeline.hooks`); the 16-bit update wraps each layer's
and each owned tensor's optimizer, each with its own random stream
(`accel.pipeline.spmd.update`). The pipeline clips before the optimizer, at clip_norm times
the loss scale (`gradient_scale`); the data-parallel step clips inside it, after the
gradients are rounded to update_fmt: with clipping active the two differ by that rounding.
With a data axis > 1 each shard's backward GEMMs accumulate its weight gradient over its
own rows in acc_fmt before the shards' gradients are averaged in float32, as data-parallel
hardware would; the data-parallel step's partitioned emulation sums each chunk across the
devices before rounding it, as one device would. The two differ by that rounding.
"""
from __future__ import annotations

import optax
from jax import lax

from accel.errors import UserError
from accel.method import DATA_PARALLEL, PIPELINE, Method
from accel.lowprec.formats import FORMATS
from accel.lowprec.gemm import GemmSettings, LayerSettings, LowPrecConv, LowPrecDotGeneral
from accel.lowprec.optimizer import lowprec_updates, round_to_format, scale_gradient

TRANSFORMERS = ('transformer_lm', 'bert')
CLASSIFIERS = ('cnn', 'mlp', 'resnet')


def _gemm(block, name: str) -> GemmSettings:
  for key in ('operand_fmt', 'acc_fmt', 'mul_fmt'):
    if block[key] not in FORMATS:
      raise UserError(f'lowprec.{name}.{key} must be one of {", ".join(FORMATS)}, '
                      f'got {block[key]!r}')
  if block.mode not in ('exact', 'fast') or block.rounding not in ('nearest', 'stochastic'):
    raise UserError(f'lowprec.{name}: mode exact|fast and rounding nearest|stochastic, got '
                    f'{block.mode!r}, {block.rounding!r}')
  if block.chunk_size < 1:
    raise UserError(f'lowprec.{name}.chunk_size must be >= 1, got {block.chunk_size}')
  if block.impl not in ('jax', 'pallas', 'auto'):
    raise UserError(f'lowprec.{name}.impl must be jax, pallas or auto, got {block.impl!r}')
  return GemmSettings(block.operand_fmt, block.acc_fmt, block.mul_fmt, block.chunk_size,
                      block.mode, block.rounding, block.impl)


def layer_settings(lp) -> LayerSettings:
  return LayerSettings(_gemm(lp.fwd, 'fwd'), _gemm(lp.bwd_data, 'bwd_data'),
                       _gemm(lp.bwd_weight, 'bwd_weight'), seed=lp.seed)


class LowPrecision(Method):
  """The method: low-precision GEMMs injected into the model, 16-bit weights and update."""
  block = 'lowprec'
  models = TRANSFORMERS + CLASSIFIERS
  layouts = (DATA_PARALLEL, PIPELINE)

  def check(self, config) -> None:
    lp = config.lowprec
    layer_settings(lp)
    if lp.update_fmt != 'fp32' and lp.update_fmt not in FORMATS:
      raise UserError(f'lowprec.update_fmt must be one of {", ".join(FORMATS)}, got '
                      f'{lp.update_fmt!r}')

  def model_overrides(self, config) -> dict:
    """Constructor hooks for `accel.models.build_model`."""
    lp = config.lowprec
    settings = layer_settings(lp)
    dot = LowPrecDotGeneral(settings)
    last = lax.dot_general if lp.exempt_first_last else dot
    if config.model.name in TRANSFORMERS:
      return {'dot_general': dot, 'head_dot_general': last}
    conv = LowPrecConv(settings)
    return {'dot_general': dot, 'conv_general_dilated': conv, 'logits_dot_general': last,
            'first_conv_general_dilated': (lax.conv_general_dilated if lp.exempt_first_last
                                           else conv)}

  def init_variables(self, config, variables: dict) -> dict:
    """Initial parameters rounded into update_fmt, where `wrap_optimizer` keeps them."""
    lp = config.lowprec
    if lp.update_fmt == 'fp32':
      return variables
    return {**variables, 'params': round_to_format(variables['params'], lp.update_fmt)}

  def transform_outputs(self, config, outputs):
    """Loss scaling: the outputs' cotangent (hence every backward GEMM) times loss_scale."""
    return scale_gradient(outputs, config.lowprec.loss_scale)

  def gradient_scale(self, config) -> float:
    return config.lowprec.loss_scale

  def wrap_optimizer(self, config, tx: optax.GradientTransformation
                     ) -> optax.GradientTransformation:
    """16-bit weights/state with the configured update rounding, the loss scale divided out."""
    lp = config.lowprec
    if lp.update_fmt == 'fp32':
      return optax.chain(optax.scale(1.0 / lp.loss_scale), tx) if lp.loss_scale != 1 else tx
    return lowprec_updates(tx, lp.update_fmt, rounding=lp.update_rounding,
                           loss_scale=lp.loss_scale, seed=lp.seed)


METHOD = LowPrecision()
