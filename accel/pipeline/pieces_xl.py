"""Transformer-XL cut into pure functions of parameter pieces, for pipeline modules.

Parameters of `accel.models.transformer_xl.TransformerXL` (blocks already in the scan layout):
  E_VxD  = params['token_embed']['embedding']   (tied: input lookup and output logits)
  layers = params['stack']['layers']            (every leaf has a leading layer axis)
  first  = {}                                   (relative positions: no position table)
  last   = {'out_bias': .., 'final_ln': .., 'adaptive_clusters': ..}
                                                (final_ln only for PreLN, adaptive_clusters
                                                only with the adaptive softmax)
Module functions (Dai et al. 2019, sections 3.2-3.3; the model's own methods, so the
pipeline computes exactly the model `accel.tasks.segment_lm` trains):
  embed      x = E[tokens] * sqrt(D)
  blocks     (h, new_mem) = run_layers(layers, x, mem), mem [n, B, M, D] the memory of
             exactly these n layers; new_mem = stop_gradient([mem ; x_layer][-M:])
  head_loss  mean CE of logits = (LN_f)(dropout(h)) E^T + b
Dropout: each function takes a key (None: deterministic) and draws the model's masks
(embedding, attention output, FF hidden and output, last hidden state) from it, as
`pieces.embed` / `pieces.blocks` do for the TransformerLM (`pieces.dropout_key`; block i
of a module from `pieces.layer_key(key, i)`, blocks run one at a time).
"""
from __future__ import annotations

import dataclasses

import jax

from accel.losses import cross_entropy
from accel.pipeline import hooks as method_hooks
from accel.models.transformer_xl import TransformerXL, TransformerXLConfig, run_layers, \
    zero_memory
from accel.pipeline.pieces import concat_layers, dropout_args, layer_key, slice_layers


@dataclasses.dataclass(frozen=True)
class TransformerXLPieces:
  """Transformer-XL as the pipeline's model interface (`accel.pipeline.families`).

  mem_len = 0: no memory (zero_memory is None, blocks attend to the segment alone).
  hooks: what the enabled methods change in blocks and head (`accel.pipeline.hooks`).
  """
  cfg: TransformerXLConfig
  hooks: method_hooks.MethodHooks = method_hooks.NONE

  @property
  def has_memory(self) -> bool:
    return self.cfg.mem_len > 0

  def model(self) -> TransformerXL:
    return TransformerXL(self.cfg)

  def init_params(self, rng, tokens_BxL):
    return TransformerXL(self.cfg).init(rng, tokens_BxL)['params']

  def split(self, params) -> dict:
    last = {name: params[name] for name in ('out_bias', 'final_ln', 'adaptive_clusters')
            if name in params}
    return {'E': params['token_embed']['embedding'], 'first': {},
            'layers': params['stack']['layers'], 'last': last}

  def join(self, E, first, layers, last) -> dict:
    del first
    return {'token_embed': {'embedding': E}, 'stack': {'layers': layers}, **last}

  def zero_memory(self, num_layers: int, batch: int):
    return zero_memory(self.cfg, batch, num_layers) if self.has_memory else None

  def embed(self, E_VxD, first, tokens_BxL, key=None):
    del first
    return TransformerXL(self.cfg).apply({'params': {'token_embed': {'embedding': E_VxD}}},
                                         tokens_BxL, method='embed', **dropout_args(key))

  def blocks(self, layers, x_BxLxD, mem_nxBxMxD, key=None, first_layer=0):
    """Blocks first_layer .. first_layer+n-1 of a module whose key is `key` (block i drops
    with `layer_key(key, first_layer + i)`), on their memory [n, B, M, D]."""
    return self.hooks.blocks(self._blocks)(layers, x_BxLxD, mem_nxBxMxD, key, first_layer)

  def _blocks(self, layers, x_BxLxD, mem_nxBxMxD, key, first_layer):
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    if n == 0:
      return x_BxLxD, mem_nxBxMxD
    mem = zero_memory(self.cfg, x_BxLxD.shape[0], n) if mem_nxBxMxD is None else mem_nxBxMxD
    new_mems = []
    for i in range(n):
      layer_k = layer_key(key, first_layer + i)
      x_BxLxD, new_mem = run_layers(self.cfg, slice_layers(layers, i, i + 1), x_BxLxD,
                                    slice_layers(mem, i, i + 1), key is None, layer_k)
      new_mems.append(new_mem)
    return x_BxLxD, None if mem_nxBxMxD is None else concat_layers(new_mems)

  def head_loss(self, E_VxD, last, x_BxLxD, targets_BxL, key=None):
    logits_BxLxV = TransformerXL(self.cfg).apply(
        {'params': {'token_embed': {'embedding': E_VxD}, **last}}, x_BxLxD, method='logits',
        **dropout_args(key))
    return cross_entropy(self.hooks.outputs(logits_BxLxV), targets_BxL).mean()
