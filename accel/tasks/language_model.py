"""Next-token prediction with a decoder LM."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from accel.losses import cross_entropy_and_hits
from accel.tasks.base import LN2, Task


@dataclasses.dataclass
class LanguageModelTask(Task):
  """loss = mean CE in nats per token; accuracy = top-1 (argmax) accuracy, from the loss's own
  pass over the logits (`accel.losses.cross_entropy_and_hits`); perplexity = exp(loss); bits
  per byte = loss / ln 2 / bytes_per_token (1 for bytes; a lossless subword tokenizer's
  ratio, `accel.data.tokenization`), reported only where bytes_per_token > 0."""
  bytes_per_token: float = 1.0

  def inputs(self, batch):
    return batch['inputs']

  def objective(self, logits_BxLxV, batch):
    ce_BxL, hits_BxL = cross_entropy_and_hits(logits_BxLxV, batch['targets'])
    loss, accuracy = ce_BxL.mean(), hits_BxL.mean()
    metrics = {'loss': loss, 'accuracy': accuracy, 'perplexity': jnp.exp(loss)}
    if self.bytes_per_token:
      metrics['bits_per_byte'] = loss / LN2 / self.bytes_per_token
    return loss, metrics

  def tokens_per_example(self):
    return self.config.data.seq_len
