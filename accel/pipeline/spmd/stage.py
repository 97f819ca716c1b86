"""What one stage does at iteration t, as values inside the shard_map: its roles, the
batches and history slots of its modules, its dropout keys and the cut of its layer stack
into segments A = layers[:a] and B = layers[a:] (`accel.pipeline.spmd` docstring).

Every stage runs the same ops; the roles are values selected by `jnp.where` on masks of
lax.axis_index('stage'), never a branch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from accel.pipeline import pieces
from accel.pipeline.spmd.state import slice_mem

_tmap = jax.tree_util.tree_map


def keep(mask, new, old):
  """`new` where mask (a scalar, or one entry per leading index), else `old`."""
  return _tmap(lambda x, y: jnp.where(
      mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x, y), new, old)


def perms(layout) -> tuple[list, list]:
  """(forward, backward) ppermute pairs: to the next / previous stage (tied: a ring)."""
  s = layout.num_stages
  if layout.tied_ring:
    return [(i, (i + 1) % s) for i in range(s)], [(i, (i - 1) % s) for i in range(s)]
  return [(i, i + 1) for i in range(s - 1)], [(i, i - 1) for i in range(1, s)]


def advance_tokens(tokens, batch, t, num_modules: int):
  """The token ring [2K-1, B, L] with batch t written; returns (tokens, the inputs of batch
  t-2(K-1) (module 0's backward), the targets of batch t-(K-1) (the loss))."""
  size = 2 * num_modules - 1
  tokens = _tmap(lambda ring, new: lax.dynamic_update_index_in_dim(ring, new, t % size, 0),
                 tokens, batch)
  inputs_bwd = lax.dynamic_index_in_dim(tokens['inputs'], (t + 1) % size, 0, False)
  targets = lax.dynamic_index_in_dim(tokens['targets'], (t + num_modules) % size, 0, False)
  return tokens, inputs_bwd, targets


@dataclasses.dataclass(frozen=True)
class Iteration:
  """This stage at iteration t. The stage's delayed module is module `me` (tied ring:
  segment B's, untied: A's); its history slot is b mod R for its batch b."""
  t: Any
  me: Any              # lax.axis_index('stage')
  is_first: Any        # stage 0: embeds, owns 'first'
  is_last: Any         # the loss stage (module K-1)
  b0: Any              # the batch module 0 back-propagates, t - 2(K-1)
  slot_now: Any        # the slot the delayed module's forward of this iteration writes
  slot_b: Any          # the slot its backward of this iteration reads

  @classmethod
  def at(cls, t, me, num_modules: int, ring_slots: int, last_stage: int) -> 'Iteration':
    is_first, is_last = me == 0, me == last_stage
    b0 = t - 2 * (num_modules - 1)
    return cls(t=t, me=me, is_first=is_first, is_last=is_last, b0=b0,
               slot_now=(t - me) % ring_slots, slot_b=(b0 + me) % ring_slots)


@dataclasses.dataclass(frozen=True)
class Segments:
  """The stage's layers cut at a: with the weights w (backward templates, 'recompute')
  and with the weights the forwards run with (w, or predicted); the memory of each."""
  layers_a: Any
  layers_b: Any
  layers_a_fwd: Any
  layers_b_fwd: Any
  mem_a: Any
  mem_b: Any
  module_a: Any        # segment A's module on this stage
  first_b: Any         # B's first block within its module

  @classmethod
  def cut(cls, layers, layers_fwd, mem, split: int, num_layers: int, module_a_S,
          it: Iteration) -> 'Segments':
    a, n = split, num_layers
    layers_a = pieces.slice_layers(layers, 0, a)
    layers_b = pieces.slice_layers(layers, a, n)
    layers_a_fwd = pieces.slice_layers(layers_fwd, 0, a)
    layers_b_fwd = pieces.slice_layers(layers_fwd, a, n)
    mem_a, mem_b = slice_mem(mem, 0, a), slice_mem(mem, a, n)
    module_a = module_a_S[it.me]
    return cls(layers_a=layers_a, layers_b=layers_b, layers_a_fwd=layers_a_fwd,
               layers_b_fwd=layers_b_fwd, mem_a=mem_a, mem_b=mem_b, module_a=module_a,
               first_b=jnp.where(it.is_first, 0, a))


@dataclasses.dataclass(frozen=True)
class Keys:
  """Dropout keys (None without dropout) of segment A's, segment B's and the embedding's
  batch: forward ('_now') and delayed backward ('_bwd'), `pieces.dropout_key` of (batch,
  module) on this data shard."""
  a_now: Any
  a_bwd: Any
  b_now: Any
  b_bwd: Any
  emb_now: Any
  emb_bwd: Any

  @classmethod
  def at(cls, dropout_key, it: Iteration, seg: Segments) -> 'Keys':
    mod_a, t, b0, me = seg.module_a, it.t, it.b0, it.me
    a_now, a_bwd = dropout_key(t - mod_a, mod_a), dropout_key(b0 + mod_a, mod_a)
    b_now, b_bwd = dropout_key(t - me, me), dropout_key(b0 + me, me)
    emb_now, emb_bwd = dropout_key(t, 0), dropout_key(b0, 0)
    return cls(a_now=a_now, a_bwd=a_bwd, b_now=b_now, b_bwd=b_bwd, emb_now=emb_now,
               emb_bwd=emb_bwd)
