"""The Ouroboros pipeline as a method: it supplies the parallel layout 'pipeline'.

`pipeline.enabled` replaces the data-parallel trainer by `accel.pipeline.trainer`'s, for the
decoder Transformer LM and Transformer-XL on language-model data. Other methods compose
with it when they list 'pipeline' among their `layouts` (`accel.method`).
"""
from __future__ import annotations

import numpy as np

from accel.method import PIPELINE, Method, StepPlan
from accel.pipeline import trainer


class OuroborosPipeline(Method):
  block = 'pipeline'
  layout = PIPELINE
  layouts = (PIPELINE,)
  models = ('transformer_lm', 'transformer_xl')

  def plan(self, config, step: int) -> StepPlan:
    """With a synchronous warm-up of N steps (`accel.pipeline.remedies`): steps t < N carry
    'pipeline_synchronous' of shape (1,), the later ones of shape (0,), so the two kinds
    of step are two compiled programs chosen on the host."""
    n = config.pipeline.sync_warmup_steps
    if not n:
      return StepPlan()
    synchronous = step < n
    return StepPlan({'pipeline_synchronous': np.zeros((int(synchronous),), np.bool_)},
                    {'pipeline/synchronous': float(synchronous)})

  def build_trainer(self, config, task, tx, schedule, mesh):
    return trainer.pipeline_trainer(config, task, tx, schedule, mesh)


METHOD = OuroborosPipeline()
