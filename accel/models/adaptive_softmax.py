"""Adaptive softmax (Grave et al. 2017, section 3; as Baevski & Auli 2019 and Transformer-XL's
WikiText-103 model use it), with div_val = 1 and the output tied to the input embedding.

Cutoffs 0 < c_1 < ... < c_K < V split the vocabulary, sorted by frequency, into a head
[0, c_1) and K tail clusters C_i = [c_i, c_{i+1}) (c_{K+1} = V). The head softmax runs over
the c_1 head words and one token per tail cluster:
  p(w)             = softmax([z_head ; h . W_i + b_i  (i = 1..K)])[w]               w in head
  p(w)             = p_head(cluster i) * softmax(z[C_i])[w - c_i]                   w in C_i
with z = h E^T + b the tied word logits (div_val = 1: every cluster has the full width D, so
the word logits are those of a plain softmax; W_i (D), b_i are the cluster tokens' own
parameters). Transformer-XL's base WikiText-103 config: cutoffs (20000, 40000, 200000).
Its PyTorch code reads cluster i's head probability from head column -i; here cluster i is
column c_1 + i - 1 (the same model, the parameters in another order).

`log_probs` returns log p(w) for every word, B x L x V, so the task's cross-entropy (which
is -log p(target) for normalized log-probabilities) and accuracy work unchanged. It
computes every cluster's logits at every position (static shapes): the FLOPs and the
B x L x V memory of a plain softmax. What it reproduces is the model; the speed-up that
computing a tail only where a target falls in it gives on GPU in PyTorch is not modelled.
div_val > 1 (narrower tail embeddings with projections) is not implemented.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from accel.errors import UserError


def check_cutoffs(cutoffs: Sequence[int], vocab_size: int) -> tuple[int, ...]:
  cutoffs = tuple(int(c) for c in cutoffs)
  if any(b <= a for a, b in zip((0,) + cutoffs, cutoffs + (vocab_size,))):
    raise UserError(f'model.adaptive_cutoffs {cutoffs} must increase strictly within '
                    f'(0, vocab size {vocab_size})')
  return cutoffs


def log_probs(word_logits_BxLxV: jax.Array, cluster_logits_BxLxK: jax.Array,
              cutoffs: Sequence[int]) -> jax.Array:
  """log p(w) of every word (module docstring), float32 B x L x V."""
  z = word_logits_BxLxV.astype(jnp.float32)
  bounds = tuple(cutoffs) + (z.shape[-1],)
  head = jax.nn.log_softmax(
      jnp.concatenate([z[..., :bounds[0]], cluster_logits_BxLxK.astype(jnp.float32)], -1), -1)
  parts = [head[..., :bounds[0]]]
  for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    cluster = head[..., bounds[0] + i: bounds[0] + i + 1]
    parts.append(cluster + jax.nn.log_softmax(z[..., start:stop], -1))
  return jnp.concatenate(parts, -1)


class ClusterTokens(nn.Module):
  """The K tail clusters' head logits h . W_i + b_i, float32 B x L x K."""
  num_clusters: int
  dot_general: object = jax.lax.dot_general

  @nn.compact
  def __call__(self, h_BxLxD):
    weight_KxD = self.param('weight', nn.initializers.normal(0.02),
                            (self.num_clusters, h_BxLxD.shape[-1]))
    bias_K = self.param('bias', nn.initializers.zeros, (self.num_clusters,))
    logits_BxLxK = self.dot_general(h_BxLxD, weight_KxD.astype(h_BxLxD.dtype),
                                    (((2,), (1,)), ((), ())))
    return logits_BxLxK.astype(jnp.float32) + bias_K
