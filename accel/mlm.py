"""Masked language modelling over bytes (BERT, Devlin et al. 2019, section 3.1; PLD's pretraining).

Vocabulary: the 256 byte values, then the special tokens PAD, CLS and MASK (259 in all).
An encoder input is [CLS] followed by text bytes; CLS and PAD are never masked.

Masking (`mask_tokens`): in each sequence round(0.15 * n) of its n maskable tokens are
selected uniformly at random; each selected token is replaced by MASK with probability
0.8, by a uniformly random byte with probability 0.1, and left unchanged with probability
0.1. The loss is the cross-entropy at the selected positions only (`mlm_loss`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

BYTE_VOCAB = 256
PAD_ID = BYTE_VOCAB
CLS_ID = BYTE_VOCAB + 1
MASK_ID = BYTE_VOCAB + 2
VOCAB_SIZE = BYTE_VOCAB + 3

SELECT_RATE = 0.15
MASK_RATE = 0.8      # of the selected: -> MASK
RANDOM_RATE = 0.1    # of the selected: -> a random byte; the remaining 0.1 stay unchanged


def with_cls(bytes_BxN: jax.Array) -> jax.Array:
  """[CLS] + bytes, int32 Bx(N+1)."""
  cls_Bx1 = jnp.full((bytes_BxN.shape[0], 1), CLS_ID, jnp.int32)
  return jnp.concatenate([cls_Bx1, bytes_BxN.astype(jnp.int32)], axis=1)


def mask_tokens(rng: jax.Array, tokens_BxL: jax.Array):
  """BERT masking. Returns (inputs_BxL, targets_BxL = tokens_BxL, weights_BxL in {0, 1})."""
  select_rng, action_rng, random_rng = jax.random.split(rng, 3)
  maskable_BxL = tokens_BxL < BYTE_VOCAB
  # Rank maskable positions in a random order; the first round(0.15 n) of each row are selected.
  scores_BxL = jnp.where(maskable_BxL, jax.random.uniform(select_rng, tokens_BxL.shape), 2.0)
  rank_BxL = jnp.argsort(jnp.argsort(scores_BxL, axis=1), axis=1)
  num_select_Bx1 = jnp.round(SELECT_RATE * maskable_BxL.sum(1, keepdims=True))
  selected_BxL = (rank_BxL < num_select_Bx1) & maskable_BxL

  action_BxL = jax.random.uniform(action_rng, tokens_BxL.shape)
  random_bytes_BxL = jax.random.randint(random_rng, tokens_BxL.shape, 0, BYTE_VOCAB)
  replaced_BxL = jnp.where(action_BxL < MASK_RATE, MASK_ID,
                           jnp.where(action_BxL < MASK_RATE + RANDOM_RATE,
                                     random_bytes_BxL, tokens_BxL))
  inputs_BxL = jnp.where(selected_BxL, replaced_BxL, tokens_BxL).astype(jnp.int32)
  return inputs_BxL, tokens_BxL.astype(jnp.int32), selected_BxL.astype(jnp.float32)


def mlm_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array):
  """sum(w * CE) / sum(w): mean cross-entropy over the selected positions; and accuracy."""
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  count = jnp.maximum(weights_BxL.sum(), 1.0)
  loss = (ce_BxL * weights_BxL).sum() / count
  accuracy = ((logits_BxLxV.argmax(-1) == targets_BxL) * weights_BxL).sum() / count
  return loss, accuracy
