"""The TransformerLM cut into pure functions of parameter pieces, for pipeline modules.

Parameters use the spine's scan layout (`TransformerConfig.scan_layers=True`):
  E_VxD  = params['token_embed']['embedding']   (tied: input lookup and output logits)
  P_MxD  = params['pos_embed']
  layers = params['stack']['layers']            (every leaf has a leading layer axis)
  final_ln = params['final_ln']                 (PreLN only; {} for PostLN)
The functions call the spine's `TransformerLM.embed`, `BlockStack` and
`TransformerLM.logits`, so the pipeline computes exactly the model the spine trains;
`TransformerLMPieces` presents them as the pipeline's model interface (`families`).

Dropout: `embed` and `blocks` take a key (None: deterministic). Module j's forward of
batch b draws its masks from k = `dropout_key(rng, b, j, shard)`, a pure function of the
train rng, the batch, the module and the data shard, so its delayed backward can re-derive
the very same masks: the embedding (module 0) from k itself, as `TransformerLM.embed`
does, and the module's i-th block from `layer_key(k, i)` = fold_in(k, i). Blocks run one
at a time, so the masks do not depend on how a module is cut into `blocks` calls (the SPMD
program runs a module in two segments: `blocks(layers[a:], .., first_layer=a)`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from accel.losses import cross_entropy
from accel.models.transformer import BlockStack, TransformerConfig, TransformerLM
from accel.pipeline import hooks as method_hooks


def scan_config(cfg: TransformerConfig) -> TransformerConfig:
  """The pipeline slices the layer axis, so the parameters use the scanned layout."""
  return dataclasses.replace(cfg, scan_layers=True)


def dropout_key(rng, batch, module, shard=0):
  """fold_in(fold_in(fold_in(rng, batch), module), shard); None if rng is None.

  fold_in(rng, batch) is the spine's per-step dropout rng (`accel.train`): batch b enters
  the pipeline at iteration b. `shard` is the data shard (lax.axis_index('data')).
  """
  if rng is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, batch), module), shard)


def layer_key(key, layer):
  """The key of a module's block `layer` (0-based within the module) from the module's key."""
  return None if key is None else jax.random.fold_in(key, layer)


def dropout_args(key):
  """apply() arguments: dropout masks from `key`, or deterministic if it is None."""
  return {'deterministic': key is None, 'rngs': {} if key is None else {'dropout': key}}


def embed(cfg, E_VxD, P_MxD, tokens_BxL, key=None):
  """x = dropout(E[tokens] + P[:L])."""
  return TransformerLM(cfg).apply(
      {'params': {'token_embed': {'embedding': E_VxD}, 'pos_embed': P_MxD}},
      tokens_BxL, method='embed', **dropout_args(key))


def blocks(cfg, layers, x_BxLxD, key=None, first_layer=0):
  """Blocks first_layer .. first_layer+n-1 of a module whose key is `key`; `layers` leaves
  are [n, ...] (n may be 0: identity). Block i drops with `layer_key(key, first_layer + i)`.
  The blocks run one at a time (unrolled): a stage runs few of them, and a loop over them
  costs step time on GPU (GPT-2 small on one H200: 371k tokens/s scanned vs 474k looped,
  README "Measured").
  """
  for i in range(jax.tree_util.tree_leaves(layers)[0].shape[0]):
    x_BxLxD = BlockStack(cfg, 1).apply({'params': {'layers': slice_layers(layers, i, i + 1)}},
                                       x_BxLxD, **dropout_args(layer_key(key, first_layer + i)))
  return x_BxLxD


def head_loss(cfg, E_VxD, final_ln, x_BxLxD, targets_BxL, outputs=method_hooks.NONE.outputs):
  """Mean token cross-entropy of outputs(logits), logits = LN_f(x) @ E^T (outputs: the
  methods' transform of the head's outputs, `hooks`)."""
  variables = {'token_embed': {'embedding': E_VxD},
               'pos_embed': jnp.zeros((cfg.max_len, cfg.d_model), jnp.float32)}
  if cfg.pre_ln:
    variables['final_ln'] = final_ln
  logits_BxLxV = TransformerLM(cfg).apply({'params': variables}, x_BxLxD, method='logits')
  return cross_entropy(outputs(logits_BxLxV), targets_BxL).mean()   # the spine's loss, float32


def full_loss(cfg, params, tokens_BxL, targets_BxL, layout=None, keys_K=None):
  """The whole model's loss (synchronous training and the baselines).

  Deterministic, or with `layout` and keys_K[j] = `dropout_key(rng, b, j)`: module j's
  blocks (module 0: and the embedding) with the masks the pipeline draws for batch b.
  """
  ranges = layout.module_ranges() if layout is not None else ((0, cfg.num_layers),)
  keys_K = keys_K if keys_K is not None else [None] * len(ranges)
  E_VxD = params['token_embed']['embedding']
  x = embed(cfg, E_VxD, params['pos_embed'], tokens_BxL, keys_K[0])
  for (start, stop), key in zip(ranges, keys_K):
    x = blocks(cfg, slice_layers(params['stack']['layers'], start, stop), x, key)
  return head_loss(cfg, E_VxD, params.get('final_ln', {}), x, targets_BxL)


def slice_layers(layers, start: int, stop: int):
  return jax.tree_util.tree_map(lambda a: a[start:stop], layers)


def concat_layers(pieces):
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *pieces)


@dataclasses.dataclass(frozen=True)
class TransformerLMPieces:
  """The TransformerLM as the pipeline's model interface (`accel.pipeline.families`).

  Parts: first = {'pos_embed': P_MxD} (module 0), last = {'final_ln': ...} (module K-1;
  {} for PostLN). No recurrence memory: `blocks` passes mem=None through. hooks: what the
  enabled methods change in blocks and head (`accel.pipeline.hooks`).
  """
  cfg: TransformerConfig
  hooks: method_hooks.MethodHooks = method_hooks.NONE
  has_memory = False

  def model(self) -> TransformerLM:
    return TransformerLM(self.cfg)

  def init_params(self, rng, tokens_BxL):
    return TransformerLM(self.cfg).init(rng, tokens_BxL)['params']

  def split(self, params) -> dict:
    last = {'final_ln': params['final_ln']} if self.cfg.pre_ln else {}
    return {'E': params['token_embed']['embedding'], 'first': {'pos_embed': params['pos_embed']},
            'layers': params['stack']['layers'], 'last': last}

  def join(self, E, first, layers, last) -> dict:
    return {'token_embed': {'embedding': E}, 'pos_embed': first['pos_embed'],
            'stack': {'layers': layers}, **last}

  def zero_memory(self, num_layers: int, batch: int):
    del num_layers, batch
    return None

  def embed(self, E_VxD, first, tokens_BxL, key=None):
    return embed(self.cfg, E_VxD, first['pos_embed'], tokens_BxL, key)

  def blocks(self, layers, x_BxLxD, mem, key=None, first_layer=0):
    return self.hooks.blocks(blocks)(self.cfg, layers, x_BxLxD, key, first_layer), mem

  def head_loss(self, E_VxD, last, x_BxLxD, targets_BxL, key=None):
    del key   # no dropout in the head (TransformerLM.logits)
    return head_loss(self.cfg, E_VxD, last.get('final_ln', {}), x_BxLxD, targets_BxL,
                     self.hooks.outputs)
