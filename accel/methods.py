"""The methods accel has, and the enabled ones of a config combined into one object.

`Enabled(config)` is what the rest of the library sees: the task, the trainers and the loop
call its hooks (`accel.method` documents them) and never name a method.
"""
from __future__ import annotations

from typing import Callable

from accel import layerdrop, stdloss
from accel.errors import UserError
from accel.lowprec import method as lowprec
from accel.method import DATA_PARALLEL, Method, StepPlan
from accel.pipeline import method as pipeline

METHODS: tuple[Method, ...] = (layerdrop.METHOD, stdloss.METHOD, lowprec.METHOD,
                               pipeline.METHOD)


class Enabled:
  """The enabled methods of `config`, checked together; their hooks composed in order."""

  def __init__(self, config, methods: tuple[Method, ...] = METHODS):
    self.config = config
    self.methods = tuple(m for m in methods if m.enabled(config))
    layouts = [m for m in self.methods if m.layout]
    if len(layouts) > 1:
      raise UserError(f'{layouts[0].block}.enabled and {layouts[1].block}.enabled each '
                      'supply a parallel layout; enable one')
    self.layout_method = layouts[0] if layouts else None
    self.layout = self.layout_method.layout if layouts else DATA_PARALLEL
    for m in self.methods:
      if m.models is not None and config.model.name not in m.models:
        raise UserError(f'{m.block}.enabled supports model.name in {", ".join(m.models)}, '
                        f'got {config.model.name!r}')
      if m is not self.layout_method and self.layout not in m.layouts:
        raise UserError(f'{self.layout_method.block}.enabled does not compose with '
                        f'{m.block}.enabled yet')
      m.check(config)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(m.block for m in self.methods)

  def model_overrides(self) -> dict:
    overrides: dict = {}
    for m in self.methods:
      mine = m.model_overrides(self.config)
      clash = set(overrides) & set(mine)
      if clash:
        raise UserError(f'{m.block} and another method both set the model\'s {sorted(clash)}')
      overrides.update(mine)
    return overrides

  def init_variables(self, variables: dict) -> dict:
    for m in self.methods:
      variables = m.init_variables(self.config, variables)
    return variables

  def plan(self, step: int) -> StepPlan:
    plan = StepPlan()
    for m in self.methods:
      plan = plan.merge(m.plan(self.config, step))
    return plan

  def wrap_apply(self, apply_fn: Callable) -> Callable:
    """apply_fn -> fn(*a, **kw) = (outputs, aux_loss, metrics), the methods' terms summed.

    Each method's wrap_apply sees a plain apply (returning outputs) and returns one that
    also gives its (aux_loss, metrics); nested, the terms are collected on the way out.
    """
    def fn(*args, **kwargs):
      terms = []

      def plain(wrapped):
        def call(*a, **k):
          outputs, aux_loss, metrics = wrapped(*a, **k)
          terms.append((aux_loss, metrics))
          return outputs
        return call

      inner = apply_fn
      for m in self.methods:
        inner = plain(m.wrap_apply(self.config, inner))
      outputs = inner(*args, **kwargs)
      metrics = {k: v for _, mine in terms for k, v in mine.items()}
      return outputs, sum((aux for aux, _ in terms), 0.0), metrics
    return fn

  def transform_outputs(self, outputs):
    for m in self.methods:
      outputs = m.transform_outputs(self.config, outputs)
    return outputs

  def wrap_blocks(self, blocks_fn: Callable, data_axis: str | None) -> Callable:
    for m in self.methods:
      blocks_fn = m.wrap_blocks(self.config, blocks_fn, data_axis)
    return blocks_fn

  def gradient_scale(self) -> float:
    scale = 1.0
    for m in self.methods:
      scale *= m.gradient_scale(self.config)
    return scale

  def wrap_optimizer(self, tx):
    for m in self.methods:
      tx = m.wrap_optimizer(self.config, tx)
    return tx
