"""Tasks of a BERT-style encoder (`model.name=bert`): MLM pretraining and classification.

- `MaskedLMTask` (data of kind 'lm'): tokens = [CLS] + the first seq_len - 1 tokens of a
  window (bytes, or the ids of `data.tokenizer`: the data's `vocab`), masked as in BERT by
  `accel.mlm` with a key of (seed, step) (whole words for WordPiece); loss = mean
  cross-entropy over the selected positions. Evaluation masks with a fixed key.
- `TextClassificationTask` (kind 'text_classification', e.g. `shakespeare_genre`): the same
  [CLS] + bytes input, loss = mean cross-entropy of the class. With
  `finetune.pretrained_workdir` set, the encoder starts from the latest checkpoint of that
  pretraining run (only the `encoder` subtree; the pooler and classifier are new).
- `GlueFinetuneTask` (data.name glue/<task>, `accel.data.glue`): inputs already encoded as
  [CLS] a [SEP] b [SEP] PAD... (the model keeps attention off PAD); loss = mean cross-entropy
  of the class, or for STS-B (a regression) mean squared error of the one output; the
  task's own metrics (`accel.glue_metrics`) over every example of the validation split:
  `evaluate` returns per-example values and `corpus_metrics` reduces them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from accel import mlm
from accel.data import glue
from accel.data.vocabulary import BYTES, Vocabulary
from accel.errors import UserError
from accel.losses import cross_entropy
from accel.tasks.base import Task
from accel.tasks.classification import ClassificationTask

_MASK_STREAM = 0x4D4C4D   # separates the masking key from dropout's


def encoder_tokens(batch, vocab: Vocabulary = BYTES) -> jax.Array:
  """[CLS] + tokens, seq_len in all (the last token of the window is not used)."""
  return mlm.with_cls(batch['inputs'][:, :-1], vocab)


@dataclasses.dataclass
class MaskedLMTask(Task):
  """BERT masked language modelling (`accel.mlm`) over the data's vocabulary."""
  vocab: Vocabulary = BYTES

  def _masked(self, batch, rng):
    inputs, targets, weights = mlm.mask_tokens(jax.random.fold_in(rng, _MASK_STREAM),
                                               encoder_tokens(batch, self.vocab), self.vocab)
    return {'mlm_inputs': inputs, 'mlm_targets': targets, 'mlm_weights': weights}

  def init(self, rng, batch, params=None):
    return super().init(rng, self._masked(batch, rng), params)

  def inputs(self, batch):
    return batch['mlm_inputs']

  def loss(self, params, mutable, batch, rng, train: bool = True, plan_kwargs=None):
    return super().loss(params, mutable, self._masked(batch, rng), rng, train, plan_kwargs)

  def objective(self, logits_BxLxV, batch):
    loss, accuracy = mlm.mlm_loss(logits_BxLxV, batch['mlm_targets'], batch['mlm_weights'])
    return loss, {'loss': loss, 'accuracy': accuracy}

  def tokens_per_example(self):
    return self.config.data.seq_len


def load_pretrained_encoder(workdir: str) -> dict:
  """The `encoder` params of the latest checkpoint in a pretraining workdir, as numpy."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'finetune.pretrained_workdir {workdir!r} has no checkpoints/ folder')
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    step = manager.latest_step()
    if step is None:
      raise UserError(f'finetune.pretrained_workdir {workdir!r} has no checkpoint')
    # Onto this host's first device: the pretraining run may have had other devices.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          manager.item_metadata(step))
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  params = restored['params']
  if 'encoder' not in params:
    raise UserError(f'the checkpoint in {directory} is not of a model.name=bert encoder '
                    f'(params: {", ".join(sorted(params))})')
  return jax.tree.map(np.asarray, params['encoder'])


@dataclasses.dataclass
class TextClassificationTask(ClassificationTask):
  """Sequence classification from the [CLS] position; optionally from a pretrained encoder."""
  pretrained: Any = None      # encoder params (numpy) that replace the fresh ones at init

  def inputs(self, batch):
    return encoder_tokens(batch)

  def init(self, rng, batch, params=None):
    variables = super().init(rng, batch, params)
    if self.pretrained is None or params is not None:
      return variables
    fresh = variables['params']['encoder']
    want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), fresh)
    got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), self.pretrained)
    if want != got:
      raise UserError('the pretrained encoder does not match this model (check that '
                      'model.* and data.seq_len are those of the pretraining run)')
    # Loaded on the host; a callback brings it in without baking it into the program.
    encoder = jax.pure_callback(
        lambda: self.pretrained,
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), fresh))
    return {**variables, 'params': {**variables['params'], 'encoder': encoder}}

  def tokens_per_example(self):
    return self.config.data.seq_len


@dataclasses.dataclass
class GlueFinetuneTask(TextClassificationTask):
  """A GLUE task (module docstring)."""
  spec: glue.GlueTask | None = None

  def inputs(self, batch):
    return batch['inputs']

  def _per_example(self, outputs_BxC, batch):
    """(loss_B, prediction_B): CE and argmax, or squared error and the output (STS-B)."""
    if self.spec.regression:
      prediction_B = outputs_BxC[:, 0]
      return (prediction_B - batch['label']) ** 2, prediction_B
    return cross_entropy(outputs_BxC, batch['label']), outputs_BxC.argmax(-1)

  def objective(self, outputs_BxC, batch):
    loss_B, prediction_B = self._per_example(outputs_BxC, batch)
    weight_B = batch['weight']
    loss = (loss_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1.0)
    if self.spec.regression:
      return loss, {'loss': loss}
    accuracy = ((prediction_B == batch['label']) * weight_B).sum() / jnp.maximum(
        weight_B.sum(), 1.0)
    return loss, {'loss': loss, 'accuracy': accuracy}

  def evaluate(self, params, mutable, batch):
    outputs_BxC = self.apply(params, mutable, batch, jax.random.key(0), False)[0]
    loss_B, prediction_B = self._per_example(outputs_BxC, batch)
    return {'loss': loss_B, 'prediction': prediction_B, 'label': batch['label'],
            'weight': batch['weight']}

  def corpus_metrics(self, per_example: dict) -> dict:
    """eval metrics from the per-example values of a whole split (padding dropped)."""
    # scikit-learn and SciPy only where GLUE is scored (the GPU image has neither).
    from accel import glue_metrics  # pylint: disable=g-import-not-at-top
    real = per_example['weight'] > 0
    prediction, label = per_example['prediction'][real], per_example['label'][real]
    return {'loss': float(per_example['loss'][real].mean()),
            **{name: glue_metrics.METRICS[name](prediction, label)
               for name in self.spec.metrics}}
