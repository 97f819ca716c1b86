"""The history ring: what a stage keeps of its delayed module's forwards until their backward.

Per stage a ring of R = 2(K-1) slots over the batches of the stage's delayed module (module
s on stage s; the untied last stage writes entries it never reads), slot b mod R for batch
b; module j writes batch t-j and reads batch t-2(K-1)+j, d_j = 2(K-1-j) <= R iterations
apart (stage 0, d_0 = R: the same slot, read from the incoming state before it is
written). What a slot holds:
  'recompute': A's input a_in [B, L, D] (module 0: none needed, it re-embeds its tokens;
    B re-runs on A's re-run output), and with a recurrence memory the stage memory the
    batch's forward read;
  'stored': the residuals of A's and of B's jax.vjp as their forward ran (the Dense
    outputs, the block inputs and the weights, `block_vjp`; tied stage 0 stores A's too,
    unread): hist = {'a': [...], 'b': [...] (tied ring)}, one ring [S, R, data * size] per
    residual, each data shard its own, in the residual's dtype (`ring_dtype`: 16-bit
    floats as the unsigned integers of their bits). The backward rebuilds the vjp from
    them (`with_residuals`): no second pass through the Dense layers. The dropout key, the
    one residual not stored, is derived again. The backward reads its slot inside its own
    fusions; the slot is written after the backward (`after`), so XLA updates the ring in
    place (written before, it would copy every ring to keep the slot being read).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def block_vjp(mp, layers, x, mem, key=None, first_layer=0):
  """jax.vjp (in layers and x; has_aux: the new memory) of a run of a module's blocks
  (`families`: blocks from first_layer on) whose residuals are the Dense outputs (and the
  inputs, the memory read, the weights and the dropout key): the attention scores, dropout
  masks and elementwise intermediates are re-derived from them in the backward,
  deterministically, so the backward is still that of the forward as it ran.
  Returns (y, vjp, new_mem).
  """
  blocks = jax.checkpoint(mp.blocks,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return jax.vjp(lambda l, x_: blocks(l, x_, mem, key, first_layer), layers, x, has_aux=True)


def _is_key(a) -> bool:
  return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def residuals(vjp):
  """The residuals of a jax.vjp that the history stores: all its leaves but the dropout key."""
  return [a for a in jax.tree_util.tree_leaves(vjp) if not _is_key(a)]


def with_residuals(template, stored_residuals):
  """A vjp with `template`'s structure whose residuals are `stored_residuals` (`residuals`
  order).

  The template is a fresh jax.vjp of the same function on arrays of the same shapes; only
  its structure is used, so XLA drops the forward it traced. Its dropout key is kept: the
  template is built with the key of the batch being back-propagated, which is the key
  its forward ran with (`pieces.dropout_key` of batch and module).
  """
  leaves, treedef = jax.tree_util.tree_flatten(template)
  stored = iter(stored_residuals)
  return jax.tree_util.tree_unflatten(treedef, [a if _is_key(a) else next(stored)
                                                for a in leaves])


def ring_dtype(dtype):
  """The dtype a residual of `dtype` is kept in: a float narrower than 32 bits as the
  unsigned integers of its bits (XLA:CPU writes into a bfloat16 array through float32,
  which copies the whole ring), any other as itself."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(f'uint{8 * dtype.itemsize}')
  return dtype


def _bitcast(v, dtype):
  return v if v.dtype == dtype else lax.bitcast_convert_type(v, dtype)


def read(ring, slot, like):
  """Slot `slot` of each local ring [R, size], as an array of the shape and dtype of the
  corresponding one of `like`."""
  return [_bitcast(lax.dynamic_index_in_dim(leaf, slot, 0, False), v.dtype).reshape(v.shape)
          for leaf, v in zip(ring, like)]


def write(ring, values, slot):
  """Each local ring [R, size] with its value (any shape of that size) written into `slot`."""
  return [lax.dynamic_update_index_in_dim(leaf, _bitcast(v, leaf.dtype).reshape(-1), slot, 0)
          for leaf, v in zip(ring, values)]


def after(index, tree):
  """`index` (an integer scalar), made to depend on every leaf of `tree`.

  XLA orders ops by data dependence only (an optimization barrier is dropped before
  scheduling), so an op that must run after the ops computing `tree` takes this index.
  It reads one element x of each leaf (a leaf's producer must not be cheap enough for XLA
  to recompute that element alone: use reductions and collectives) and adds
  (x != x) & (x == x): 0 for every x, NaN included, but not foldable.
  """
  x = sum(v.ravel()[0].astype(jnp.float32) for v in jax.tree_util.tree_leaves(tree))
  return index + ((x != x) & (x == x)).astype(index.dtype)
