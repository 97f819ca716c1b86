"""Masked language modelling (BERT, Devlin et al. 2019, section 3.1; PLD's pretraining).

Token ids: `accel.data.vocabulary.Vocabulary` — bytes (256 values, then PAD, CLS, MASK and
SEP: 260 in all) or a trained subword tokenizer's. An encoder input is [CLS] followed by
text tokens; only text tokens are ever masked.

Masking (`mask_tokens`): in each sequence round(0.15 * n) of its n maskable tokens are
selected at random; each selected token is replaced by MASK with probability 0.8, by a
uniformly random text token with probability 0.1, and left unchanged with probability
0.1. The loss is the cross-entropy at the selected positions only (`mlm_loss`).
Units: with a vocabulary that marks word starts (WordPiece) whole words are selected, as
BERT's whole-word masking does: words are taken in a random order, each with all its
pieces, up to the first word that would take the count past round(0.15 n) (BERT's code goes
on to try the later words; here the row stops there, so a row selects somewhat fewer than
round(0.15 n) tokens); otherwise (bytes, BPE) each token is a unit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from accel.data.vocabulary import BYTES, Vocabulary

SELECT_RATE = 0.15
MASK_RATE = 0.8      # of the selected: -> MASK
RANDOM_RATE = 0.1    # of the selected: -> a random text token; the remaining 0.1 stay unchanged


def with_cls(tokens_BxN: jax.Array, vocab: Vocabulary = BYTES) -> jax.Array:
  """[CLS] + tokens, int32 Bx(N+1)."""
  cls_Bx1 = jnp.full((tokens_BxN.shape[0], 1), vocab.cls, jnp.int32)
  return jnp.concatenate([cls_Bx1, tokens_BxN.astype(jnp.int32)], axis=1)


def _select(rng, tokens_BxL, maskable_BxL, vocab: Vocabulary):
  """The selected positions, bool BxL (module docstring)."""
  budget_Bx1 = jnp.round(SELECT_RATE * maskable_BxL.sum(1, keepdims=True))
  uniform_BxL = jax.random.uniform(rng, tokens_BxL.shape)
  if vocab.word_start is None:
    # Rank maskable positions in a random order; the first round(0.15 n) are selected.
    scores_BxL = jnp.where(maskable_BxL, uniform_BxL, 2.0)
    rank_BxL = jnp.argsort(jnp.argsort(scores_BxL, axis=1), axis=1)
    return (rank_BxL < budget_Bx1) & maskable_BxL
  # A word is a word start (or a special token) and the continuation pieces after it; word
  # k's score is uniform[k] (k < L: one independent draw per word), and a word is selected
  # if the tokens of the words scored at most as low as it (itself included) fit in the
  # budget.
  starts_BxL = jnp.asarray(vocab.word_start)[tokens_BxL] | ~maskable_BxL
  word_BxL = jnp.cumsum(starts_BxL, axis=1) - 1
  scores_BxL = jnp.where(maskable_BxL, jnp.take_along_axis(uniform_BxL, word_BxL, axis=1), 2.0)
  tokens_up_to_BxL = (scores_BxL[:, None, :] <= scores_BxL[:, :, None]).sum(2)
  return (tokens_up_to_BxL <= budget_Bx1) & maskable_BxL


def mask_tokens(rng: jax.Array, tokens_BxL: jax.Array, vocab: Vocabulary = BYTES):
  """BERT masking. Returns (inputs_BxL, targets_BxL = tokens_BxL, weights_BxL in {0, 1})."""
  select_rng, action_rng, random_rng = jax.random.split(rng, 3)
  maskable_BxL = (tokens_BxL >= vocab.text_start) & (tokens_BxL < vocab.text_stop)
  selected_BxL = _select(select_rng, tokens_BxL, maskable_BxL, vocab)
  action_BxL = jax.random.uniform(action_rng, tokens_BxL.shape)
  random_BxL = jax.random.randint(random_rng, tokens_BxL.shape, vocab.text_start,
                                  vocab.text_stop)
  replaced_BxL = jnp.where(action_BxL < MASK_RATE, vocab.mask,
                           jnp.where(action_BxL < MASK_RATE + RANDOM_RATE,
                                     random_BxL, tokens_BxL))
  inputs_BxL = jnp.where(selected_BxL, replaced_BxL, tokens_BxL).astype(jnp.int32)
  return inputs_BxL, tokens_BxL.astype(jnp.int32), selected_BxL.astype(jnp.float32)


def mlm_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array):
  """sum(w * CE) / sum(w): mean cross-entropy over the selected positions; and accuracy."""
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  count = jnp.maximum(weights_BxL.sum(), 1.0)
  loss = (ce_BxL * weights_BxL).sum() / count
  accuracy = ((logits_BxLxV.argmax(-1) == targets_BxL) * weights_BxL).sum() / count
  return loss, accuracy
