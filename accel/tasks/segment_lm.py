"""Segment-recurrent language modelling (Transformer-XL): memory carried across steps.

Training: batches are contiguous streams (`data.order = 'contiguous'`: row b of step t+1
continues row b of step t), and the model's memory lives in the 'mems' collection, which the
training loop keeps in `TrainState.mutable` and passes from one step to the next; gradients
stop at the memory (Dai et al. 2019, section 3.2).

Evaluation: the rows of a validation batch are consecutive windows of the validation stream
(`input_pipeline._eval_batches`), so they are scored one after another with the memory
carried from row to row, starting from zeros at each batch: the Transformer-XL evaluation,
with the memory reset every `eval_batch_size` segments.
"""
from __future__ import annotations

import dataclasses

from jax import lax
from jax.sharding import PartitionSpec as P

from accel.errors import UserError
from accel.models import transformer_xl
from accel.tasks.language_model import LanguageModelTask


@dataclasses.dataclass
class SegmentLMTask(LanguageModelTask):
  """Next-token prediction with a recurrence memory in `mutable['mems']`."""

  def __post_init__(self):
    if self.config.data.order != 'contiguous':
      raise UserError(f'model.name={self.config.model.name} carries memory from one batch to '
                      "the next and needs data.order='contiguous' "
                      f'(got {self.config.data.order!r})')

  def mutable_spec(self, collection: str):
    """The memory [N, B, M, D] lies with its batch rows (each data shard its streams)."""
    return P(None, 'data') if collection == 'mems' else P()

  def evaluate(self, params, mutable, batch):
    del mutable                                   # the training streams' memory

    def next_segment(mems_NxBxMxD, tokens_L):
      logits_1xLxV, mems_NxBxMxD = self.model.apply(
          {'params': params}, tokens_L[None], mems_NxBxMxD, method='segment')
      return mems_NxBxMxD, logits_1xLxV[0]
    zeros = transformer_xl.zero_memory(self.model.cfg, 1)
    _, logits_BxLxV = lax.scan(next_segment, zeros, batch['inputs'])
    return self.objective(logits_BxLxV, batch)[1]

