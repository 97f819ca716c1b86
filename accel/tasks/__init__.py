"""Tasks: what a model is trained for, chosen by (model family, kind of data).

`build_task(config, info, methods)` builds the model with the enabled methods' constructor
overrides and returns the task registered for (config.model.name, info.kind) in `TASKS`.
"""
from __future__ import annotations

from typing import Callable

from accel import models
from accel.errors import UserError
from accel.models.cnn import MODELS as IMAGE_MODELS
from accel.tasks.base import Task
from accel.tasks.classification import ClassificationTask
from accel.data import glue
from accel.tasks.encoder import (GlueFinetuneTask, MaskedLMTask, TextClassificationTask,
                                 load_pretrained_encoder)
from accel.tasks.language_model import LanguageModelTask
from accel.tasks.segment_lm import SegmentLMTask


def _text_classification(config, info, model, methods):
  workdir = config.get('finetune', {}).get('pretrained_workdir', '')
  pretrained = load_pretrained_encoder(workdir) if workdir else None
  if config.data.name in glue.NAMES:
    return GlueFinetuneTask(config, model, methods, pretrained=pretrained,
                            spec=glue.TASKS[glue.task_of(config.data.name)])
  return TextClassificationTask(config, model, methods, pretrained=pretrained)


def _image_classification(config, info, model, methods):
  return ClassificationTask(config, model, methods, ('batch_stats',))


# (model.name, data kind) -> builder(config, dataset info, model, methods) -> Task
TASKS: dict[tuple[str, str], Callable[..., Task]] = {
    ('transformer_lm', 'lm'): lambda c, i, m, e: LanguageModelTask(
        c, m, e, bytes_per_token=i.bytes_per_token),
    ('transformer_xl', 'lm'): lambda c, i, m, e: SegmentLMTask(
        c, m, e, ('mems',), bytes_per_token=i.bytes_per_token),
    ('bert', 'lm'): lambda c, i, m, e: MaskedLMTask(c, m, e, vocab=i.vocab),
    ('bert', 'text_classification'): _text_classification,
    **{(name, 'image'): _image_classification for name in IMAGE_MODELS},
}


def build_task(config, info, methods) -> Task:
  """methods: `accel.methods.Enabled(config)`."""
  model = models.build_model(config, info, **methods.model_overrides())
  key = (config.model.name, info.kind)
  if key not in TASKS:
    kinds = sorted(kind for name, kind in TASKS if name == config.model.name)
    raise UserError(f'model.name={config.model.name} has no task for data of kind '
                    f'{info.kind!r} (data.name={config.data.name!r}); it trains on '
                    f'{" or ".join(kinds) or "no data kind"}')
  return TASKS[key](config, info, model, methods)


__all__ = ['TASKS', 'Task', 'ClassificationTask', 'LanguageModelTask', 'MaskedLMTask',
           'SegmentLMTask', 'TextClassificationTask', 'GlueFinetuneTask', 'build_task']
