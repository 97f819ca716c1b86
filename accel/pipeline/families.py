"""The one interface between the Ouroboros pipeline and a model family.

`for_config(cfg, hooks)` returns the family's pieces object (a frozen dataclass, hashable,
so jitted functions take it as a static argument), with the enabled methods' hooks
(`accel.pipeline.hooks`; default none):

  model()                          the flax module (evaluation)
  init_params(rng, tokens_BxL)     the model's params
  split(params) -> {'E', 'first', 'layers', 'last'}, join(E, first, layers, last) -> params
      E the tied token table (modules 0 and K-1), first the rest of module 0's own
      parameters, layers the blocks in scan layout [L, ...], last module K-1's own head
  has_memory                       whether blocks carry a recurrence memory
  zero_memory(n, B)                recurrence memory of n layers at a fresh stream
                                   ([n, B, M, D]), or None for a model without one
  embed(E, first, tokens_BxL, key) -> x_BxLxD
  blocks(layers, x_BxLxD, mem, key, first_layer=0) -> (y_BxLxD, new_mem)   any
                                   consecutive run of a module's blocks, starting at its
                                   block first_layer, with the memory of exactly those
                                   layers (None passes through); block i draws its masks
                                   from `pieces.layer_key(key, i)`
  head_loss(E, last, x_BxLxD, targets_BxL, key) -> mean cross-entropy
  key: the dropout key (None: deterministic), `pieces.dropout_key` of (batch, module).

Families: TransformerConfig -> `pieces.TransformerLMPieces` (the spine's decoder),
TransformerXLConfig -> `pieces_xl.TransformerXLPieces`.
"""
from __future__ import annotations

from accel.models.transformer import TransformerConfig
from accel.models.transformer_xl import TransformerXLConfig
from accel.pipeline import hooks as method_hooks, pieces, pieces_xl


def for_config(cfg, hooks: method_hooks.MethodHooks = method_hooks.NONE):
  """The pieces of the model `cfg` configures (TransformerLM blocks switched to scan layout)."""
  if isinstance(cfg, TransformerConfig):
    return pieces.TransformerLMPieces(pieces.scan_config(cfg), hooks)
  if isinstance(cfg, TransformerXLConfig):
    return pieces_xl.TransformerXLPieces(cfg, hooks)
  raise TypeError(f'the pipeline has no pieces for {type(cfg).__name__}')
