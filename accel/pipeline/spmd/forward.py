"""Forward phase: a_out = A(a_in); tied ring: send = B(where(stage 0, embed(batch t), a_out)).

Tied ring (S = K-1, a = n_last): stage 0's A is module K-1 (input: the activation received,
batch t-(K-1)), its B module 0 (input: the embedding of batch t); stage s >= 1 runs module
s as A then B on batch t-s. Untied (S = K, a = n, B empty): A is module s, stage 0's input
is the embedding. Every stage embeds; the embedding is used on stage 0 only. 'stored' runs
the forwards as `ring.block_vjp` and keeps their residuals for the history; 'recompute' runs
them plain (the backward re-runs them).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from accel.pipeline import pieces
from accel.pipeline.spmd import ring
from accel.pipeline.spmd.stage import Iteration, Keys, Segments


@dataclasses.dataclass(frozen=True)
class Forward:
  a_in: Any            # segment A's input [B, L, D]
  a_out: Any           # segment A's output: on the loss stage the head's input
  b_in: Any            # segment B's input (tied ring; None untied)
  send: Any            # what goes to the next stage
  residuals: Any       # 'stored': {'a': [...], 'b': [...] (tied)}, this iteration's history entry
  new_mem: Any         # the stage's memory after these forwards (None: no memory)


def forward(mp, tied: bool, stored: bool, E, first_fwd, inputs, act_in, mem,
            seg: Segments, keys: Keys, it: Iteration) -> Forward:
  """The stage's forwards of this iteration (first_fwd: module 0's own params the
  embedding runs with; inputs: the tokens of batch t)."""
  x_emb = mp.embed(E, first_fwd, inputs, keys.emb_now)
  a_in = act_in if tied else jnp.where(it.is_first, x_emb, act_in)
  entry = None
  if stored:
    a_out, vjp_a, new_mem_a = ring.block_vjp(mp, seg.layers_a_fwd, a_in, seg.mem_a, keys.a_now)
    entry = {'a': ring.residuals(vjp_a)}
  else:
    a_out, new_mem_a = mp.blocks(seg.layers_a, a_in, seg.mem_a, keys.a_now)
  b_in = None
  if tied:
    b_in = jnp.where(it.is_first, x_emb, a_out)
    if stored:
      send, vjp_b, new_mem_b = ring.block_vjp(mp, seg.layers_b_fwd, b_in, seg.mem_b,
                                              keys.b_now, seg.first_b)
      entry['b'] = ring.residuals(vjp_b)
    else:
      send, new_mem_b = mp.blocks(seg.layers_b, b_in, seg.mem_b, keys.b_now, seg.first_b)
    new_mem = None if mem is None else pieces.concat_layers([new_mem_a, new_mem_b])
  else:
    send, new_mem = a_out, new_mem_a
  return Forward(a_in=a_in, a_out=a_out, b_in=b_in, send=send, residuals=entry,
                 new_mem=new_mem)
