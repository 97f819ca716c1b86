"""Ouroboros: a stale-gradient model-parallel pipeline for Transformer LMs.

Yang, Huo, Wang, Carin, NeurIPS 2019 (arXiv 1909.06695); papers.md section 1.

Models: the spine's decoder Transformer (`pieces.TransformerLMPieces`) and Transformer-XL
(`pieces_xl.TransformerXLPieces`: relative positions, segment-level recurrence memory). The
pipeline sees a model only through its pieces (`families`: embed, blocks(layers, x, mem) ->
(y, new_mem), head_loss, split / join of the params).

The algorithm (iteration t = 0, 1, ...; batch b enters the pipeline at iteration b;
modules j = 0..K-1 as cut by `layout.Layout`; w_j^t = module j's weights at the start of
iteration t):

  forward   module j runs batch  f_j(t) = t - j  (the newest batch that has reached it),
            with w_j^t, on the activation module j-1 sent at iteration t-1 (module 0: the
            tokens of batch t).  It sends its output to module j+1 (next iteration).
  loss      module K-1 runs forward, loss and backward of batch t-(K-1) in the same
            iteration: its gradient is fresh (delay 0).
  backward  module j < K-1 back-propagates batch  g_j(t) = t - 2(K-1) + j, using the
            input-gradient module j+1 produced at iteration t-1, and sends its own
            input-gradient to module j-1 (next iteration).
  update    every module that has a gradient applies it with its own Adam
            (Ouroboros+Adam), then w^{t+1}.

Counted in batches relative to the loss-side module (batch t-(K-1)), module j (1-indexed
k = j+1) updates with the gradient of the batch K-1-j = K-k earlier: the paper's delays,
K-1 for the first module and 0 for the last. Counted in module j's own iterations, the
batch was forwarded d_j = 2(K-1-j) iterations before its backward (`Layout.delay`), so
module j keeps its last d_j forwards in a static ring buffer.

Relation to DDG's formula w_j^{t+1} = w_j^t - lr * grad_j(w^{t-(K-1-j)}): there the forward
of a batch passes all modules within one step (forward-locked), so the weight staleness is
K-1-j steps. Here the forward is pipelined as well (one module per iteration, no device
waits for another's forward), so with 'stored' the gradient module j applies at t was
computed with its weights w_j^{t-d_j}, d_j = 2(K-1-j) updates old (the last module: 0),
and with 'recompute' with its current weights but on an input that earlier modules
produced d_j iterations ago.

Warm-up: the loss module has its first batch at iteration K-1 and module j its first
gradient at iteration 2(K-1)-j; until then a module does not update (its Adam count
does not advance). During warm-up forwards run on zero activations whose results are
never used.

Recurrence memory (Transformer-XL): module j keeps the memory of its own n_j layers,
mem_j [n_j, B, M, D] (in the SPMD state per stage; the tied ring's stage 0 holds module 0's
and module K-1's). Module j forwards batches in order (b = t - j), so mem_j advances batch by
batch exactly as in synchronous segment training (contiguous batches: row r of batch b+1
continues row r of batch b); only the weights it is computed with are stale. No gradient
flows into the memory (stop_gradient, as the model does). The delayed backward of batch b
uses the memory batch b's forward read: 'stored' has it among the vjp residuals,
'recompute' keeps it in the history ring next to the stored input.

Tied embedding E (`layout` docstring): E is used by module 0 (input lookup) and by module
K-1 (output logits). Its gradient at iteration t is the sum of the output-side part
(batch t-(K-1), fresh) and the input-side part (batch t-2(K-1), i.e. K-1 batches older);
one Adam state updates it.

Which weights the delayed backward uses (`backward_weights`):
  'stored'    the forward as it ran at iteration t - d_j, weights w_j^{t-d_j} (DDG,
              Huo et al. 2018). Exact gradient of that forward.
  'recompute' re-run module j's forward on its stored input with the current w_j^t, then
              back-propagate (Features Replay, Huo et al. 2018).
Memory per module j (B x L x D activations, R_j = d_j; Transformer-XL: n_j layers with
memory length M, so the memory of the module is n_j B M D):
  'recompute' R_j inputs (B L D each) and one extra forward per backward; Transformer-XL:
              plus the memory each delayed batch read, R_j n_j B M D (at M = L, n_j times
              the inputs' size), on top of the module's live memory n_j B M D;
  'stored'    R_j sets of vjp residuals of the module's forward as it ran, the weights
              as they were included. The reference keeps jax.vjp's full residuals; the
              SPMD program keeps only the Dense outputs (about 11 B L D per PreLN block,
              `spmd.ring.block_vjp`) and re-derives attention scores and elementwise
              intermediates from them in the backward (the same values: same inputs,
              same weights, same ops), instead of ~50 B L D + 5 B H L L per block.
              Transformer-XL: the memory read is among the residuals (n_j B M D per set)
              and the key/value Dense outputs cover M + L positions.
  The SPMD program keeps one ring of R = 2(K-1) slots per stage (the largest d_j; the memory
  ring holds the whole stage's n = L/S layers per slot); the reference keeps exactly what
  each module needs.

Weight prediction (`pipeline.weight_prediction` = s > 0, 'stored' only; `prediction`):
module j's forward at iteration t runs with its weights extrapolated along its last update,
  w_hat_j = w_j^t + s * d_j * (w_j^t - w_j^{t-1}),   d_j = 2(K-1-j),
an estimate of the weights the gradient will be applied to (SpecTrain, Chen et al. 2018,
arXiv 1809.02839; PipeMare's discrepancy correction is related). The stored residuals are
those of that forward, so the delayed backward is the exact gradient at w_hat_j; it is
applied to w_j. Predicted: the blocks and module 0's own params ('first'); not the loss-side
module (d = 0) and not the tied table E (shared by module 0 and the loss-side module).
Memory: one more copy of each stage's block weights and 'first' (w^{t-1}, in the state,
checkpointed); s = 0 keeps neither the copy nor any change to the program.

Dropout: module j draws the masks of batch b from a key that is a function of (seed, b,
j) and the data shard (`pieces.dropout_key`; its block i from fold_in of that key and i,
`pieces.layer_key`, however the module is cut into calls), so its delayed backward,
'stored' or 'recompute', uses the masks its forward used.
Gradient clipping (optimizer.clip_norm = c > 0): every gradient applied at iteration t,
all modules' and the tied table's, is scaled by min(1, c / their global norm)
(`clipping`); these are gradients of different batches.

Everything else (schedule of the loss) is plain training; `synchronous=True` in the
reference forces f_j(t) = g_j(t) = t (all delays 0), which is ordinary synchronous
training (with dropout: with module j's masks of batch t drawn from its key).
"""
from accel.pipeline.layout import Layout

__all__ = ['Layout']
