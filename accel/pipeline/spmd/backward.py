"""Backward phase: dx_B = B's delayed vjp (from the history), g_A = where(loss stage, head
gradient, dx_B) (untied: the received gradient), dx_A = A's vjp, fresh from this
iteration's forward on the loss stage, delayed from the history elsewhere; dx_A is sent
back. The embedding's backward takes stage 0's dx_B (untied: dx_A), and is used on stage 0
only (module 0's batch t-2(K-1) exists from t = 2(K-1) on).

'stored' rebuilds each delayed vjp from the residuals in its history slot
(`ring.with_residuals`, the template traced at the current weights and dropped by XLA);
'recompute' re-runs the forward on the stored input with w^t (Features Replay).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from accel.pipeline import pieces
from accel.pipeline.spmd import ring
from accel.pipeline.spmd.forward import Forward
from accel.pipeline.spmd.stage import Iteration, Keys, Segments, keep
from accel.pipeline.spmd.state import slice_mem


def stored_vjps(mp, tied: bool, hist, fwd: Forward, seg: Segments, keys: Keys,
                it: Iteration):
  """(A's vjp, B's vjp or None) rebuilt from slot slot_b of the residual rings; on the loss
  stage A's from this iteration's forward (delay 0)."""
  hist_b = {seg_name: ring.read(r, it.slot_b, fwd.residuals[seg_name])
            for seg_name, r in hist.items()}
  res_a = [jnp.where(it.is_last, now, old) for now, old in zip(fwd.residuals['a'], hist_b['a'])]
  vjp_a = ring.with_residuals(
      ring.block_vjp(mp, seg.layers_a, jnp.zeros_like(fwd.a_in), seg.mem_a, keys.a_bwd)[1],
      res_a)
  vjp_b = None
  if tied:
    vjp_b = ring.with_residuals(ring.block_vjp(mp, seg.layers_b, jnp.zeros_like(fwd.b_in),
                                               seg.mem_b, keys.b_bwd, seg.first_b)[1],
                                hist_b['b'])
  return vjp_a, vjp_b


def recomputed_vjps(mp, tied: bool, E, first, inputs_bwd, a_in_b_hist, mem_hist_b,
                    fwd: Forward, seg: Segments, keys: Keys, it: Iteration, split: int,
                    num_layers: int):
  """(A's vjp, B's vjp or None) of the forwards re-run with w^t on the stored input
  a_in_b_hist (module 0: its re-embedded tokens inputs_bwd) and the memory they read."""
  a, n = split, num_layers
  x_emb_b = mp.embed(E, first, inputs_bwd, keys.emb_bwd)
  a_in_b = jnp.where(it.is_last, fwd.a_in, a_in_b_hist)
  if not tied:
    a_in_b = jnp.where(it.is_first, x_emb_b, a_in_b)
  a_re, vjp_a, _ = ring.block_vjp(mp, seg.layers_a, a_in_b,
                                  keep(it.is_last, seg.mem_a, slice_mem(mem_hist_b, 0, a)),
                                  keys.a_bwd)
  vjp_b = None
  if tied:
    _, vjp_b, _ = ring.block_vjp(mp, seg.layers_b, jnp.where(it.is_first, x_emb_b, a_re),
                                 slice_mem(mem_hist_b, a, n), keys.b_bwd, seg.first_b)
  return vjp_a, vjp_b


def blocks_backward(vjp_a, vjp_b, grad_in, g_head, it: Iteration):
  """(gradient of the stage's layers, dx_A to send back, the gradient at the embedding's
  output: dx_B on the tied ring, dx_A untied)."""
  if vjp_b is not None:
    g_layers_b, dx_b = vjp_b(grad_in)
    g_layers_a, send = vjp_a(jnp.where(it.is_last, g_head, dx_b))
    return pieces.concat_layers([g_layers_a, g_layers_b]), send, dx_b
  g_layers, send = vjp_a(jnp.where(it.is_last, g_head, grad_in))
  return g_layers, send, send


def gradients(mp, tied: bool, num_modules: int, E, first, inputs_bwd, dx_emb, g_layers,
              g_E_out, g_last, keys: Keys, it: Iteration, first_batch: int = 0):
  """All the stage's gradients: its layers', the tied table E's (output-side part on the
  loss stage, input-side part on stage 0 once module 0's batch b0 >= first_batch; untied,
  the two copies add each other's part), module 0's 'first' and module K-1's 'last'."""
  _, vjp = jax.vjp(lambda e, f: mp.embed(e, f, inputs_bwd, keys.emb_bwd), E, first)
  g_E_in, g_first = vjp(dx_emb)
  g_E = (jnp.where(it.is_last, g_E_out, 0.0)
         + jnp.where(it.is_first & (it.b0 >= first_batch), g_E_in, 0.0))
  g = {'layers': g_layers, 'E': g_E, 'first': g_first, 'last': g_last}
  if not tied:
    k = num_modules
    g['E'] = g['E'] + lax.ppermute(g['E'], 'stage', [(0, k - 1), (k - 1, 0)])
  return g
