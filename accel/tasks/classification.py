"""Image (or sequence) classification."""
from __future__ import annotations

from accel.losses import cross_entropy
from accel.tasks.base import Task


class ClassificationTask(Task):
  """loss = mean CE of the class."""

  def inputs(self, batch):
    return batch['image']

  def objective(self, logits_BxC, batch):
    loss = cross_entropy(logits_BxC, batch['label']).mean()
    accuracy = (logits_BxC.argmax(-1) == batch['label']).mean()
    return loss, {'loss': loss, 'accuracy': accuracy}
