"""What a method is: the one interface through which a method attaches to training.

A method is one module (`accel/layerdrop.py`, `accel/stdloss.py`, `accel/lowprec/method.py`,
`accel/pipeline/method.py`) that defines a subclass of `Method` and one instance of it,
`METHOD`, listed in `accel.methods.METHODS`. Its config block `config.<block>` switches it
on (`<block>.enabled`). It contributes through these hooks, each with a neutral default, so
a method overrides only what it changes:

  hook                               called by                 contributes
  check(config)                      methods.Enabled           validation before anything
                                                               is prepared (UserError)
  model_overrides(config)            tasks.build_task          constructor attributes of the
                                                               model (an injected dot_general)
  init_variables(config, variables)  Task.init                 the initial variables (e.g.
                                                               rounded into a 16-bit format)
  plan(config, step)                 the training loop         host-side inputs of train step
                                                               `step` (StepPlan): model kwargs
                                                               decided on the host, and metrics
  wrap_apply(config, apply_fn)       Task.apply (training)     the model's apply, returning
                                                               (outputs, aux_loss, metrics)
  transform_outputs(config, outputs) Task.loss (training);     the outputs before the objective
                                     the pipeline's head
  wrap_blocks(config, blocks_fn,     the pipeline's stages     a run of the model's blocks, for a
    data_axis)                                                 method that acts inside the layers
                                                               (the pipeline runs no wrap_apply:
                                                               its stages run pieces of the model)
  gradient_scale(config)             the pipeline's clip       the factor its transform_outputs
                                                               multiplies every gradient by
  wrap_optimizer(config, tx)         trainer.build_trainer     the optimizer
  layout / build_trainer             trainer.build_trainer     a parallel layout of its own
                                                               (the Ouroboros pipeline)

and declares what it composes with: `layouts` (the parallel layouts it runs under: a
method with a layout of its own composes with the methods that list that layout) and
`models` (the `model.name`s it supports; None: any). `accel.methods.Enabled` refuses any
other combination with one error naming the pair.

Host-side plans. What a method decides per step from (seed, step) alone (layer-drop gates)
is decided on the host, before the step is dispatched, and enters the jitted step as
arrays: the same bits on every host and replica with no communication, and no device-side
`cond` or `switch`, whose predicate XLA:GPU brings back to the host (design.md). The
arrays' shapes may differ from step to step: each distinct shape signature is its own
compiled program (the loop keeps them, `accel.programs`), and the FLOPs the loop reports are
the cost analysis of the program that ran.

A fifth method is one new file with its `Method` subclass, its config block in
`accel.config_lib.base_config` and its tests, plus one line in `accel.methods.METHODS`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

DATA_PARALLEL = 'data_parallel'
PIPELINE = 'pipeline'         # the Ouroboros pipeline's layout (`accel.pipeline.method`)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What the host decided for one train step.

  model_kwargs: arrays passed to the model's training apply (as keyword arguments); their
    shapes select the compiled program.
  metrics: host values logged with the step's metrics (under 'train/').
  """
  model_kwargs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)

  def merge(self, other: 'StepPlan') -> 'StepPlan':
    clash = set(self.model_kwargs) & set(other.model_kwargs)
    if clash:
      raise ValueError(f'two methods plan the same model inputs: {sorted(clash)}')
    return StepPlan({**self.model_kwargs, **other.model_kwargs},
                    {**self.metrics, **other.metrics})


class Method:
  """A method's contributions; every hook defaults to "no change"."""

  block: str = ''                               # its config block, config[block].enabled
  layouts: tuple[str, ...] = (DATA_PARALLEL,)   # the parallel layouts it composes with
  models: tuple[str, ...] | None = None         # the model.names it supports; None: any
  layout: str | None = None                     # a parallel layout it supplies, if any

  def enabled(self, config) -> bool:
    return bool(config[self.block].enabled)

  def check(self, config) -> None:
    """Raises UserError for a config this method cannot run; before anything runs."""

  def model_overrides(self, config) -> dict[str, Any]:
    return {}

  def init_variables(self, config, variables: dict) -> dict:
    return variables

  def plan(self, config, step: int) -> StepPlan:
    return StepPlan()

  def wrap_apply(self, config, apply_fn: Callable) -> Callable:
    """The training apply: apply_fn returns outputs; the result returns (outputs,
    aux_loss added to the task loss, metrics)."""
    return lambda *args, **kwargs: (apply_fn(*args, **kwargs), 0.0, {})

  def transform_outputs(self, config, outputs):
    return outputs

  def wrap_blocks(self, config, blocks_fn: Callable, data_axis: str | None) -> Callable:
    """The pipeline's run of blocks (`accel.pipeline.hooks`); data_axis: the mesh axis
    the batch is split over where they run (None: they see the whole batch)."""
    return blocks_fn

  def gradient_scale(self, config) -> float:
    """The factor every gradient arrives multiplied by from transform_outputs (undone in
    wrap_optimizer): a layout that clips before the optimizer clips at clip_norm times it."""
    return 1.0

  def wrap_optimizer(self, config, tx):
    return tx

  def build_trainer(self, config, task, tx, schedule, mesh):
    raise NotImplementedError(f'{type(self).__name__} supplies no layout')
