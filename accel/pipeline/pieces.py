"""The TransformerLM cut into pure functions of parameter pieces, for pipeline modules.

Parameters use the spine's scan layout (`TransformerConfig.scan_layers=True`):
  E_VxD  = params['token_embed']['embedding']   (tied: input lookup and output logits)
  P_MxD  = params['pos_embed']
  layers = params['stack']['layers']            (every leaf has a leading layer axis)
  final_ln = params['final_ln']                 (PreLN only; {} for PostLN)
The functions call the spine's `TransformerLM.embed`, `BlockStack` and
`TransformerLM.logits`, so the pipeline computes exactly the model the spine trains.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from accel.models.transformer import BlockStack, TransformerConfig, TransformerLM


def scan_config(cfg: TransformerConfig) -> TransformerConfig:
  """The pipeline slices the layer axis, so blocks use the scanned parameter layout, and
  unrolled: a stage runs few blocks, and a loop over them costs step time on GPU (GPT-2
  small on one H200: 371k tokens/s scanned vs 474k looped, README "Measured").
  """
  if cfg.dropout_rate:
    raise ValueError('the pipeline runs the blocks deterministically; set dropout_rate=0')
  return dataclasses.replace(cfg, scan_layers=True, scan_unroll=cfg.num_layers)


def embed(cfg, E_VxD, P_MxD, tokens_BxL):
  """x = E[tokens] + P[:L]."""
  return TransformerLM(cfg).apply(
      {'params': {'token_embed': {'embedding': E_VxD}, 'pos_embed': P_MxD}},
      tokens_BxL, method='embed')


def blocks(cfg, layers, x_BxLxD):
  """Blocks of one module; `layers` leaves are [n, ...] (n may be 0: identity)."""
  n = jax.tree_util.tree_leaves(layers)[0].shape[0]
  if n == 0:
    return x_BxLxD
  return BlockStack(cfg, n).apply({'params': {'layers': layers}}, x_BxLxD)


def head_loss(cfg, E_VxD, final_ln, x_BxLxD, targets_BxL):
  """Mean token cross-entropy of logits = LN_f(x) @ E^T."""
  variables = {'token_embed': {'embedding': E_VxD},
               'pos_embed': jnp.zeros((cfg.max_len, cfg.d_model), jnp.float32)}
  if cfg.pre_ln:
    variables['final_ln'] = final_ln
  logits_BxLxV = TransformerLM(cfg).apply({'params': variables}, x_BxLxD, method='logits')
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()


def full_loss(cfg, params, tokens_BxL, targets_BxL):
  """The whole model's loss (synchronous training and the baselines)."""
  x = embed(cfg, params['token_embed']['embedding'], params['pos_embed'], tokens_BxL)
  x = blocks(cfg, params['stack']['layers'], x)
  return head_loss(cfg, params['token_embed']['embedding'], params.get('final_ln', {}),
                   x, targets_BxL)


def slice_layers(layers, start: int, stop: int):
  return jax.tree_util.tree_map(lambda a: a[start:stop], layers)


def concat_layers(pieces):
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *pieces)
