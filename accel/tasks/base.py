"""The task base: what a model is trained to do — its inputs, its loss, its metrics.

A task owns the model and turns (params, mutable collections, batch, rng) into
`loss, (metrics, new_mutable)`. The enabled methods (`accel.methods.Enabled`, given to the
task by `accel.tasks.build_task`) attach here through their hooks, never by name: the
initial variables (`init_variables`), the training apply (`wrap_apply`: an auxiliary
loss and its metrics), host-decided model inputs of the step (`plan_kwargs`) and the
outputs before the objective (`transform_outputs`). Evaluation runs the plain model.

Metrics are scalars under 'train/…' or 'eval/…' names after the loop prefixes them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

LN2 = math.log(2.0)


@dataclasses.dataclass
class Task:
  """Base: the trainers call `init`, `loss` (train) and `evaluate` (eval)."""
  config: Any
  model: nn.Module
  methods: Any                     # accel.methods.Enabled
  mutable_collections: tuple = ()

  def init(self, rng, batch, params=None) -> dict:
    """The initial variables; params: the model's params to start from (None: from rng);
    either way the methods' init_variables apply."""
    variables = self.model.init({'params': rng, 'dropout': rng}, self.inputs(batch), train=False)
    if params is not None:
      variables = {**variables, 'params': params}
    return self.methods.init_variables(variables)

  def inputs(self, batch):
    raise NotImplementedError

  def objective(self, outputs, batch):
    """(loss, metrics) of the model's outputs on `batch`."""
    raise NotImplementedError

  def train_objective(self, outputs, batch):
    """(loss, metrics) of a training step; default `objective`."""
    return self.objective(outputs, batch)

  def tokens_per_example(self) -> int:
    return 0

  def mutable_spec(self, collection: str):
    """How a mutable collection lies on the data mesh: replicated, unless the task keeps
    it per batch row (`SegmentLMTask`'s memory)."""
    del collection
    return jax.sharding.PartitionSpec()

  def apply(self, params, mutable, batch, rng, train: bool, plan_kwargs=None):
    """Returns (outputs, new_mutable, method_metrics, aux_loss)."""
    variables = {'params': params, **mutable}
    if not train:
      return self.model.apply(variables, self.inputs(batch), train=False), mutable, {}, 0.0
    model_apply = self.methods.wrap_apply(self.model.apply)
    kwargs = dict(rngs={'dropout': rng}, **(plan_kwargs or {}))
    if self.mutable_collections:
      (out, new_mutable), aux_loss, metrics = model_apply(
          variables, self.inputs(batch), train=True, mutable=list(self.mutable_collections),
          **kwargs)
      return out, dict(new_mutable), metrics, aux_loss
    out, aux_loss, metrics = model_apply(variables, self.inputs(batch), train=True, **kwargs)
    return out, mutable, metrics, aux_loss

  def loss(self, params, mutable, batch, rng, train: bool = True, plan_kwargs=None):
    outputs, new_mutable, metrics, aux_loss = self.apply(params, mutable, batch, rng, train,
                                                         plan_kwargs)
    if train:
      outputs = self.methods.transform_outputs(outputs)
    objective = self.train_objective if train else self.objective
    task_loss, task_metrics = objective(outputs, batch)
    return task_loss + aux_loss, ({**task_metrics, **metrics}, new_mutable)

  def evaluate(self, params, mutable, batch):
    return self.loss(params, mutable, batch, jax.random.key(0), train=False)[1][0]
