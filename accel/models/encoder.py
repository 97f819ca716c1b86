"""BERT-style encoder heads on the bidirectional `TransformerLM` (cfg.causal=False).

Both models keep the encoder under the parameter name `encoder`, so a classifier starts
from a pretrained masked LM by copying that subtree (`accel.tasks.encoder`).

- `MaskedLM`: logits_BxLxV = LN_f(Blocks(E[tokens] + P)) @ E^T, the output projection
  tied to the token embedding (BERT section 3.1; PLD pretraining, papers.md section 2).
- `SequenceClassifier`: logits_BxC = W_c tanh(W_p LN_f(h)[:, 0] + b_p) + b_c, the BERT
  pooler on the first ([CLS]) position (BERT section 4), LN_f only for PreLN; C = 1 for a
  regression (STS-B). With `pad_id` no position attends to PAD tokens (padded GLUE pairs).

Both accept the layer-dropping plan of `TransformerLM` (the kept blocks' ids and keep
probabilities, `accel.layerdrop`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from accel.models.transformer import TransformerConfig, TransformerLM


class MaskedLM(nn.Module):
  """Token logits of a bidirectional encoder with tied embeddings."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, train: bool = False, layer_ids_N=None, keep_probs_N=None):
    encoder = TransformerLM(self.cfg, name='encoder')
    return encoder(tokens_BxL, train=train, layer_ids_N=layer_ids_N, keep_probs_N=keep_probs_N)


class SequenceClassifier(nn.Module):
  """Class logits from the encoder's [CLS] position through a tanh pooler."""
  cfg: TransformerConfig
  num_classes: int
  pad_id: int | None = None

  @nn.compact
  def __call__(self, tokens_BxL, *, train: bool = False, layer_ids_N=None, keep_probs_N=None):
    cfg = self.cfg
    encoder = TransformerLM(cfg, name='encoder')
    key_mask_BxL = None if self.pad_id is None else tokens_BxL != self.pad_id
    h_BxLxD = encoder.features(tokens_BxL, train=train, layer_ids_N=layer_ids_N,
                               keep_probs_N=keep_probs_N, key_mask_BxL=key_mask_BxL)
    if encoder.final_ln is not None:
      h_BxLxD = encoder.final_ln(h_BxLxD)
    pooled_BxD = jnp.tanh(nn.Dense(cfg.d_model, dtype=cfg.dtype, name='pooler')(
        h_BxLxD[:, 0]))
    pooled_BxD = nn.Dropout(cfg.dropout_rate)(pooled_BxD, deterministic=not train)
    logits_BxC = nn.Dense(self.num_classes, dtype=cfg.dtype, name='classifier')(pooled_BxD)
    return logits_BxC.astype(jnp.float32)
