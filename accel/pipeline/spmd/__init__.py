"""The Ouroboros pipeline as one jitted SPMD program over a ('data', 'stage') mesh.

One call of `Pipeline.step` is one iteration t of the algorithm in `accel.pipeline`'s
docstring, for every stage at once, inside `jax.shard_map`, in named phases:

  `state`    the state layout: stage-stacked params, per-layer optimizer state, inboxes,
             history, token ring, memory; init, shardings, the model's params back.
  `stage`    this stage at iteration t: roles, batches, history slots, dropout keys, and
             the cut of its n local blocks into segments A = layers[:a], B = layers[a:].
  `forward`  a_out = A(a_in), send = B(where(stage 0, embed(batch t), a_out)).
  `head`     LN_f, logits, loss and its gradient on a_out (used on the loss stage).
  `backward` B's and A's delayed vjps (A fresh on the loss stage), the embedding's.
  `update`   pmean over 'data', global-norm clip, each module's own optimizer where it has
             a gradient.
  `ring`     the history ring the delayed backward reads (stored residuals or inputs).
  `program`  `Pipeline`: the phases assembled into the step, `lax.ppermute` sending the
             forward outputs to the next stage and the input-gradients to the previous
             one (ring S-1 -> 0 in the tied layout); they arrive as next iteration's
             inboxes.

Every stage runs the same ops, with no conditional: the roles differ only in values
selected by `jnp.where` on masks of lax.axis_index('stage'). (A `lax.switch` on the stage
index made XLA:GPU copy the branch index to the host and block the host's launch thread
until the GPU reached it, every step: results/pipeline_gpu_profile.md.)
  Tied ring (S = K-1, a = n_last): stage 0's A is module K-1 (input: the activation
  received, batch t-(K-1); loss and backward in the same iteration, delay 0), its B module
  0 (input: the embedding of batch t; backward delayed 2(K-1)); stage s >= 1 runs module s
  as A then B on batch t-s (backward delayed 2(K-1-s)).
  Untied (S = K, a = n, B empty): A is module s; stage 0's input is the embedding, stage
  K-1's A is the fresh one (loss, delay 0), the others are delayed.
Likewise every stage embeds (and, with Features Replay, re-embeds) and back-propagates the
embedding, used on stage 0 only.

Dropout: module j's forward of batch b, and its backward of b (re-run or rebuilt from the
stored residuals: the masks are re-derived from the key), use the key
`pieces.dropout_key(rng, b, j, lax.axis_index('data'))` (block i of the module:
`pieces.layer_key` of it and i, so segment B, which starts at block a of its module,
draws what one call over the whole module draws): each data shard draws its own masks, so
the masks depend on the mesh; with a data axis of 1 they are the reference's.
"""
from accel.pipeline.spmd.program import Pipeline, make_mesh

__all__ = ['Pipeline', 'make_mesh']
