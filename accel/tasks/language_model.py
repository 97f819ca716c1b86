"""Next-token prediction with a decoder LM."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from accel.losses import cross_entropy, cross_entropy_and_hits
from accel.tasks.base import LN2, Task


@dataclasses.dataclass
class LanguageModelTask(Task):
  """loss = mean CE in nats per token; accuracy = top-1 (argmax) accuracy, from the loss's own
  pass over the logits (`accel.losses.cross_entropy_and_hits`); perplexity = exp(loss); bits
  per byte = loss / ln 2 / bytes_per_token (1 for bytes; a lossless subword tokenizer's
  ratio, `accel.data.tokenization`), reported only where bytes_per_token > 0. With
  config.train_accuracy False the train step has no accuracy (the loss alone: one argmax
  less over the B x L x V logits, 0.53 ms on GPT-2 small's logits on an H200,
  results/bench_lm_gpu.md's loss table); evaluation always has it."""
  bytes_per_token: float = 1.0

  def inputs(self, batch):
    return batch['inputs']

  def objective(self, logits_BxLxV, batch, accuracy: bool = True):
    if accuracy:
      ce_BxL, hits_BxL = cross_entropy_and_hits(logits_BxLxV, batch['targets'])
    else:
      ce_BxL = cross_entropy(logits_BxLxV, batch['targets'])
    loss = ce_BxL.mean()
    metrics = {'loss': loss, 'perplexity': jnp.exp(loss)}
    if accuracy:
      metrics['accuracy'] = hits_BxL.mean()
    if self.bytes_per_token:
      metrics['bits_per_byte'] = loss / LN2 / self.bytes_per_token
    return loss, metrics

  def train_objective(self, logits_BxLxV, batch):
    return self.objective(logits_BxLxV, batch, self.config.train_accuracy)

  def tokens_per_example(self):
    return self.config.data.seq_len
