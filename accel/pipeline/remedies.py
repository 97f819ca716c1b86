"""Remedies for the stale gradients of the pipeline: the arithmetic the reference
(`reference.Reference`), the SPMD program (`spmd`) and the study's single-device step
(`simulate`) share. Each is a `pipeline.*` config key, off (0) by default; with every key 0
the programs are the plain pipeline's. Module j's delay at iteration t is d_j (2(K-1-j)
pipelined, 0 while synchronous); every remedy is the identity for d_j = 0, so it changes
neither the loss-side module nor the synchronous warm-up.

pipeline.sync_warmup_steps = N (Huo et al.'s and PipeDream's synchronous start; the issue's
  recipe): iterations t < N are synchronous training (every module forward and backward of
  batch t with w^t, delay 0: the naive model-parallel schedule, forward-locked), then the
  pipeline starts as from empty at iteration N: batches < N never enter it, every forward
  from then on runs with the current weights, and module j's first delayed gradient (batch
  N) arrives at iteration N + 2(K-1) - j. No state from the warm-up is
  stale when the pipeline starts. Not for models with a recurrence memory.

pipeline.delay_compensation = lambda (DC-ASGD, Zheng et al. 2017, ICML, arXiv 1609.08326,
  section 4, the constant-lambda form "DC-ASGD-c"; g * g is its cheap approximation of the
  Hessian's diagonal, the outer product's):
    g_comp = g + lambda * g * g * (w^t - w_fwd)
  w_fwd: the weights module j's forward of the batch ran with (w^{t-d_j} with 'stored';
  predicted ones with weight prediction), w^t the weights the gradient is applied to.
  'stored' only ('recompute' computes the gradient at w^t). Not applied to the tied table
  E (shared with the loss-side module) nor to module K-1 (d = 0).

pipeline.pipemare_steps = T (PipeMare's learning-rate rescheduling, Yang et al. 2021, MLSys,
  arXiv 1910.05124, section 3.1; the exponent schedule is written as recalled, the paper
  was not available here to check it):
    lr_j(t) = lr(t) * tau_j ** -(1 - min((t - N) / T, 1)),   tau_j = max(d_j, 1)
  module j starts the pipeline at lr / tau_j and anneals to the common lr over T iterations
  (N: the synchronous warm-up). Applied to module j's optimizer update (for Adam and Muon
  the update is linear in lr). E and module K-1: factor 1. PipeMare's second technique,
  discrepancy correction, estimates the forward's weights for a backward that runs with
  newer ones; 'stored' back-propagates through the forward's own weights, so there is no
  discrepancy to correct (weight prediction, `prediction`, is the related remedy for the
  distance between the forward's weights and the ones the gradient is applied to).

pipeline.error_feedback = c (after Zmushko et al. 2026, arXiv 2606.30634, "an Error
  Feedback-inspired correction"; the paper's formula was not available here. What is
  implemented, labelled as this codebase's reading: the error the last update made by
  applying a stale gradient is fed back, extrapolating the delayed gradients linearly
  over the delay):
    g_fb = g_t + c * d_j * (g_t - g_prev)
  g_t the gradient module j applies at t, g_prev the one it applied at its previous update
  (none before its first: no correction). With d = 1 and c = 1 this is 2 g_t - g_prev, the
  optimistic-gradient step; for synchronous training (d = 0) it is g itself. Not applied
  to E. Memory: one gradient per delayed module.

pipeline.nesterov_momentum = gamma (Ajanthan et al. 2025, "Nesterov Method for Asynchronous
  Pipeline Parallel Optimization", ICML, arXiv 2505.01099; the paper's text was not
  retrievable here: its Eqs. 8 and 10 and Prop. 1 as quoted by notes on it, the settings
  from its code, github.com/PluralisResearch/AsyncPP). NAG with its look-ahead
  d_t = gamma (w_t - w_{t-1}) (their Eq. 8: w_{t+1} = w_t + d_t - eta grad f(w_t + d_t))
  meets a gradient tau iterations late as (Eq. 10)
    w_{t+1} = w_t + d_t - eta (1 - gamma) grad f(w_{t-tau} + d_{t-tau}):
  the gradient is the one taken at the look-ahead point of the forward's own iteration,
  the momentum step fills the gap and the stale gradient is discounted by 1 - gamma; as
  gamma -> 1 the look-ahead d aligns with the delay's direction w_t - w_{t-tau} (Prop. 1).
  Their runs: gamma = 0.99 for every stage (run.bash: NAdam with b1 0.99 and PipeDream's
  weight stashing), or per stage 0.9 + 0.09 (stage delay) / stages ('--adaptive_momentum').
  Implemented, labelled as this codebase's reading for an optimizer other than SGD: Eq. 10
  with the module's optimizer's update u_t (Adam's or Muon's, lr included, from the stale
  gradient) in place of -eta grad f:
    forward of module j at t:  w_hat_j = w_j^t + gamma_j (w_j^t - w_j^{t-1})
    update:  w_j^{t+1} = w_j^t + gamma_j (w_j^t - w_j^{t-1}) + (1 - gamma_j) u_j^t
  gamma_j = gamma where d_j > 0, else 0 (the identity, as for every remedy here: the
  loss-side module, E and the synchronous warm-up run the plain optimizer; the paper's
  last stage runs NAG too). With optax.sgd(eta) this is Eq. 10 exactly (test). 'stored'
  only: the gradient is that of the look-ahead forward. Against weight prediction
  (`prediction`, s): the look-ahead alone is weight prediction with s d_j = gamma (the two
  add: w_hat_j = w_j + (s d_j + gamma_j)(w_j - w_j^{t-1})); what differs is the update,
  a heavy ball over the optimizer's updates whose steady-state step is u (an average of
  the last ~1/(1-gamma) updates), so w_j - w_j^{t-1} is that average, not the last update.
  Nor is it their runs' NAdam with b1 0.99 (the momentum inside Adam's normalisation, every
  stage): here Adam keeps its b1 and the heavy ball averages its normalised steps.
  Memory: w^{t-1} per delayed module (shared with weight prediction).

All corrections add to the raw gradient (g + the DC term + the feedback term), before the
global-norm clip; the learning-rate factor scales the optimizer's update, to which the
Nesterov step (`nesterov_update`) then adds the momentum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from accel.errors import UserError

_tmap = jax.tree_util.tree_map


def check(backward_weights: str, has_memory: bool, *, sync_warmup_steps: int = 0,
          delay_compensation: float = 0.0, pipemare_steps: int = 0,
          error_feedback: float = 0.0, nesterov_momentum: float = 0.0):
  if not 0 <= nesterov_momentum < 1:
    raise UserError(f'pipeline.nesterov_momentum must be in [0, 1), got {nesterov_momentum}')
  if nesterov_momentum and backward_weights != 'stored':
    raise UserError("pipeline.nesterov_momentum > 0 needs pipeline.backward_weights='stored'")
  for name, value in (('sync_warmup_steps', sync_warmup_steps),
                      ('delay_compensation', delay_compensation),
                      ('pipemare_steps', pipemare_steps), ('error_feedback', error_feedback)):
    if value < 0:
      raise UserError(f'pipeline.{name} must be >= 0, got {value}')
  if delay_compensation and backward_weights != 'stored':
    raise UserError("pipeline.delay_compensation > 0 needs pipeline.backward_weights='stored'")
  if sync_warmup_steps and has_memory:
    raise UserError('pipeline.sync_warmup_steps > 0 does not compose with a recurrence '
                    'memory (model.name=transformer_xl) yet')


def compensation_term(g, w, w_fwd, lam):
  """DC-ASGD's term lam * g * g * (w - w_fwd), leaf by leaf."""
  return _tmap(lambda g_, w_, f_: lam * g_ * g_ * (w_ - f_), g, w, w_fwd)


def feedback_term(g, g_prev, c_times_d):
  """The error-feedback term c d (g - g_prev), leaf by leaf; c_times_d a scalar or one
  value per index of the leaves' leading axis (a stack of layers, each its own module's
  delay)."""
  cd = jnp.asarray(c_times_d, jnp.float32)
  return _tmap(lambda a, b: _lead(cd, a) * (a - b), g, g_prev)


def lookahead_steps(delay, weight_prediction, nesterov_momentum):
  """How far module j's forward extrapolates along w - w^{t-1}: s d (weight prediction,
  `prediction`) + gamma where d > 0 (the Nesterov look-ahead); delay a number or array."""
  return weight_prediction * delay + nesterov_momentum * (delay > 0)


def nesterov_update(params, updates, prev, gamma):
  """w + gamma (w - w_prev) + (1 - gamma) u, leaf by leaf (u: the optimizer's update,
  scaled); gamma a scalar or one value per index of the leading axis."""
  g = jnp.asarray(gamma, jnp.float32)
  return _tmap(lambda w, u, p: w + _lead(g, w) * (w - p) + (1 - _lead(g, w)) * u,
               params, updates, prev)


def apply_update(params, updates, factor=None, prev=None, gamma=0.0):
  """params after the optimizer's `updates`, scaled by `factor` (PipeMare's and the lr's;
  None: 1); with prev (w^{t-1}) the Nesterov step of momentum gamma (`nesterov_update`)."""
  if factor is not None:
    updates = scale(updates, factor)
  if prev is None:
    return optax.apply_updates(params, updates)
  return nesterov_update(params, updates, prev, gamma)


def add(tree, *others):
  return _tmap(lambda a, *b: sum(b, a), tree, *others)


def pipemare_factor(t, delay, pipemare_steps: int, sync_warmup_steps: int = 0):
  """tau ** -(1 - min((t - N) / T, 1)), tau = max(delay, 1); delay a scalar or an array
  (one per layer). 1 where delay is 0, and for every module once t - N >= T."""
  tau = jnp.maximum(jnp.asarray(delay, jnp.float32), 1.0)
  progress = jnp.clip((jnp.asarray(t, jnp.float32) - sync_warmup_steps) / pipemare_steps,
                      0.0, 1.0)
  return tau ** -(1.0 - progress)


def scale(updates, factor):
  """updates * factor; factor a scalar or one value per index of the leading axis."""
  f = jnp.asarray(factor, jnp.float32)
  return _tmap(lambda u: u * _lead(f, u), updates)


def _lead(v, like):
  """v (a scalar or [n]) broadcast against `like` [n, ...], in its dtype."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)
