"""Tasks: what a model is trained to do — its loss, its metrics, its inputs.

A task owns the model and turns (params, mutable collections, batch, rng, step) into
`loss, (metrics, new_mutable)`. Methods attach here, switched on by their config block:
they change how the model is built (numerics hooks) or what one apply returns (gates, an
auxiliary loss), never the training loop.

Metrics are scalars under 'train/…' or 'eval/…' names after the loop prefixes them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from accel import layerdrop, models, stdloss
from accel.lowprec import hooks as lowprec_hooks
from accel.errors import UserError
from accel.losses import cross_entropy

LN2 = math.log(2.0)


@dataclasses.dataclass
class Task:
  """Base: the loop calls `init`, `loss` (train) and `evaluate` (eval)."""
  config: Any
  model: nn.Module
  mutable_collections: tuple = ()

  def init(self, rng, batch) -> dict:
    variables = self.model.init({'params': rng, 'dropout': rng}, self.inputs(batch), train=False)
    return lowprec_hooks.round_params(self.config, variables)

  def inputs(self, batch):
    raise NotImplementedError

  def apply(self, params, mutable, batch, rng, step, train):
    """Returns (outputs, new_mutable, method_metrics, aux_loss)."""
    variables = {'params': params, **mutable}
    kwargs = dict(rngs={'dropout': rng}) if train else {}
    gate_kwargs, metrics = layerdrop.apply_kwargs(self.config, step, train)
    kwargs.update(gate_kwargs)
    model_apply = stdloss.task_hook(self.config, self.model.apply, train)
    if train and self.mutable_collections:
      (out, new_mutable), aux_loss, std_metrics = model_apply(
          variables, self.inputs(batch), train=True,
          mutable=list(self.mutable_collections), **kwargs)
      return out, dict(new_mutable), {**metrics, **std_metrics}, aux_loss
    out, aux_loss, std_metrics = model_apply(variables, self.inputs(batch), train=train,
                                             **kwargs)
    return out, mutable, {**metrics, **std_metrics}, aux_loss

  def loss(self, params, mutable, batch, rng, step, train: bool = True):
    outputs, new_mutable, metrics, aux_loss = self.apply(params, mutable, batch, rng, step, train)
    outputs = lowprec_hooks.scale_outputs(self.config, outputs, train)
    task_loss, task_metrics = self.objective(outputs, batch)
    return task_loss + aux_loss, ({**task_metrics, **metrics}, new_mutable)

  def evaluate(self, params, mutable, batch):
    return self.loss(params, mutable, batch, jax.random.key(0), 0, train=False)[1][0]

  def objective(self, outputs, batch):
    raise NotImplementedError


@dataclasses.dataclass
class LanguageModelTask(Task):
  """Next-token prediction. loss = mean CE in nats per token; perplexity = exp(loss);
  bits per byte = loss / ln 2 / bytes_per_token (1 for bytes; a lossless subword
  tokenizer's ratio, `accel.data.tokenization`), reported only where bytes_per_token > 0."""
  bytes_per_token: float = 1.0

  def inputs(self, batch):
    return batch['inputs']

  def objective(self, logits_BxLxV, batch):
    loss = cross_entropy(logits_BxLxV, batch['targets']).mean()
    accuracy = (logits_BxLxV.argmax(-1) == batch['targets']).mean()
    metrics = {'loss': loss, 'accuracy': accuracy, 'perplexity': jnp.exp(loss)}
    if self.bytes_per_token:
      metrics['bits_per_byte'] = loss / LN2 / self.bytes_per_token
    return loss, metrics

  def tokens_per_example(self):
    return self.config.data.seq_len


class ClassificationTask(Task):
  """Image (or sequence) classification. loss = mean CE."""

  def inputs(self, batch):
    return batch['image']

  def objective(self, logits_BxC, batch):
    loss = cross_entropy(logits_BxC, batch['label']).mean()
    accuracy = (logits_BxC.argmax(-1) == batch['label']).mean()
    return loss, {'loss': loss, 'accuracy': accuracy}

  def tokens_per_example(self):
    return 0


def model_overrides(config) -> dict:
  """Constructor hooks the enabled methods inject into the model (numerics)."""
  return lowprec_hooks.model_overrides(config)


def build_task(config, info) -> Task:
  model = models.build_model(config, info, **model_overrides(config))
  if config.model.name == 'transformer_xl':
    from accel import segment_lm  # pylint: disable=g-import-not-at-top (it imports Task)
    return segment_lm.build_task(config, model, info.bytes_per_token)
  if config.model.name == 'bert':
    from accel import encoder_tasks  # pylint: disable=g-import-not-at-top (it imports Task)
    return encoder_tasks.build_task(config, info, model)
  if info.kind == 'lm':
    return LanguageModelTask(config, model, bytes_per_token=info.bytes_per_token)
  if info.kind == 'image':
    return ClassificationTask(config, model, mutable_collections=('batch_stats',))
  raise UserError(f'no task for data of kind {info.kind!r}')
