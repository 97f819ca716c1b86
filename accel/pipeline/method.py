"""The Ouroboros pipeline as a method: it supplies the parallel layout 'pipeline'.

`pipeline.enabled` replaces the data-parallel trainer by `accel.pipeline.trainer`'s, for the
decoder Transformer LM and Transformer-XL on language-model data. Other methods compose
with it when they list 'pipeline' among their `layouts` (`accel.method`).
"""
from __future__ import annotations

from accel.method import Method
from accel.pipeline import trainer

LAYOUT = 'pipeline'


class OuroborosPipeline(Method):
  block = 'pipeline'
  layout = LAYOUT
  layouts = (LAYOUT,)
  models = ('transformer_lm', 'transformer_xl')

  def build_trainer(self, config, task, tx, schedule, mesh):
    return trainer.pipeline_trainer(config, task, tx, schedule, mesh)


METHOD = OuroborosPipeline()
