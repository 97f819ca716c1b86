"""Single-device reference of the Ouroboros delayed-gradient algorithm (see package doc).

Plain Python over per-module jitted functions, messages keyed by batch index, so the
schedule reads as written in `accel.pipeline`'s docstring. The SPMD program
(`accel.pipeline.spmd`) must reproduce it; `synchronous=True` forces every delay to 0
(forward and backward of batch t at iteration t through all modules), which must equal
ordinary training with jax.grad of the whole model (for Transformer-XL: segment training
with the memory carried from step to step).

The model enters through its pieces (`accel.pipeline.families`). Module j keeps the
recurrence memory of its own layers (if the model has one) and advances it with each of its
forwards, batch by batch; no gradient flows into it.

'stored' keeps the jax.vjp of each module forward as it ran (its residuals: dropout masks
and the memory it read included); 'recompute' keeps the module input and the memory it
read, and re-runs the forward with the current weights and the same dropout key,
`pieces.dropout_key(rng, b, j)` (data shard 0).
With dropout, `synchronous=True` equals jax.grad of `pieces.full_loss` with module j's
masks from that key for batch t. Gradient clipping: `accel.pipeline.clipping`.

`weight_prediction=s > 0` ('stored' only, `accel.pipeline.prediction`): module j < K-1
runs its forward of iteration t with w_j^t + s d_j (w_j^t - w_j^{t-1}) (its own params
'layers' and, module 0, 'first'; not E), d_j its staleness (`forward_weights`); the state
keeps w^{t-1} ('prev_modules').

`forward_locked=True` runs DDG's schedule instead (Huo et al. 2018, papers.md section 1):
the forward of batch t passes every module within iteration t (on devices, each would wait
for the previous one's forward) and module j back-propagates batch t-(K-1-j), so module j's
weights are K-1-j updates stale instead of 2(K-1-j). Reference only, no SPMD program: it
measures what the pipelined forward's extra staleness costs (experiments/pipeline_staleness.py).

Remedies (`accel.pipeline.remedies`, each off at 0): `sync_warmup_steps=N` trains
iterations t < N synchronously and starts the pipeline at N with batch N (`synchronous_at`,
`first_batch`); `delay_compensation` (DC-ASGD, 'stored': the forward weights are kept with
each stored vjp, 'fwd_weights'), `error_feedback` (the gradient each module applied last,
'prev_grads') and `pipemare_steps` (a per-module factor on the optimizer's update) act on
module j's gradient and update, with its delay d_j at t (`delay`); `nesterov_momentum`
('stored') moves module j's forward to its look-ahead point and adds the momentum to its
update (both with w^{t-1}, 'prev_modules', as weight prediction).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import optax

from accel.pipeline import clipping, families, hooks as method_hooks, pieces, prediction, \
    remedies
from accel.pipeline.layout import Layout


def _first(mp, pm, E, tokens, mem, key):
  return mp.blocks(pm['layers'], mp.embed(E, pm['first'], tokens, key), mem, key)


def _middle(mp, pm, x, mem, key):
  return mp.blocks(pm['layers'], x, mem, key)


def _last(mp, pm, E, x, targets, mem, key):
  h, new_mem = mp.blocks(pm['layers'], x, mem, key)
  return mp.head_loss(E, pm['last'], h, targets, key), new_mem


# Module-level jits (pieces static) so every Reference shares the compilation cache.
# A jax.vjp object is a pytree of residuals: returning it from jit stores the forward.
# Each returns (output, [vjp,] new memory).
_jit = functools.partial(jax.jit, static_argnums=0)
_fwd_first = _jit(_first)
_fwd_middle = _jit(_middle)
_vjp_first = _jit(lambda mp, pm, E, tok, mem, key: jax.vjp(
    lambda p, e: _first(mp, p, e, tok, mem, key), pm, E, has_aux=True))
_vjp_middle = _jit(lambda mp, pm, x, mem, key: jax.vjp(
    lambda p, x_: _middle(mp, p, x_, mem, key), pm, x, has_aux=True))
_grad_last = _jit(jax.value_and_grad(_last, argnums=(1, 2, 3), has_aux=True))
_apply_vjp = jax.jit(lambda vjp, g: vjp(g))
_predict = jax.jit(prediction.predict)


@functools.partial(jax.jit, static_argnums=0)
def _update(tx, grads, opt_state, params, factor=1.0, prev=None, gamma=0.0):
  """One optimizer step; its update scaled by `factor` (PipeMare's lr factor, 1: none);
  with prev (w^{t-1}) the Nesterov step of momentum gamma (`remedies.nesterov_update`)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return remedies.apply_update(params, updates, factor, prev, gamma), opt_state


_corrected = jax.jit(lambda g, dc, fb: remedies.add(g, *(t for t in (dc, fb) if t is not None)))
_compensation_term = jax.jit(remedies.compensation_term)
_feedback_term = jax.jit(remedies.feedback_term)


class Reference:
  """state = dict(step, modules=[{'layers', 'first'?, 'last'?}], E, opt, opt_E, mems, ...)."""

  def __init__(self, cfg, layout: Layout, tx: optax.GradientTransformation,
               backward_weights: str, synchronous: bool = False, rng=None,
               clip_norm: float = 0.0, forward_locked: bool = False,
               weight_prediction: float = 0.0, sync_warmup_steps: int = 0,
               delay_compensation: float = 0.0, pipemare_steps: int = 0,
               error_feedback: float = 0.0, nesterov_momentum: float = 0.0,
               hooks: method_hooks.MethodHooks = method_hooks.NONE):
    """rng: the train rng the dropout keys derive from (needed if cfg.dropout_rate > 0);
    clip_norm: c of `accel.pipeline.clipping` (0: no clipping); tx must not clip;
    weight_prediction: s of `accel.pipeline.prediction` (0: off); the remedies: N, lambda,
    T, c and gamma of `accel.pipeline.remedies` (0: off); hooks: the enabled methods'
    (`accel.pipeline.hooks`), the blocks seeing the whole batch."""
    prediction.check(weight_prediction, backward_weights)
    if backward_weights not in ('stored', 'recompute'):
      raise ValueError(f'backward_weights={backward_weights!r}')
    if cfg.dropout_rate and rng is None:
      raise ValueError('dropout_rate > 0 needs the rng its masks derive from')
    self.model_pieces = families.for_config(cfg, hooks)
    remedies.check(backward_weights, self.model_pieces.has_memory,
                   sync_warmup_steps=sync_warmup_steps, delay_compensation=delay_compensation,
                   pipemare_steps=pipemare_steps, error_feedback=error_feedback,
                   nesterov_momentum=nesterov_momentum)
    self.sync_warmup_steps, self.delay_compensation = sync_warmup_steps, delay_compensation
    self.pipemare_steps, self.error_feedback = pipemare_steps, error_feedback
    self.nesterov_momentum = nesterov_momentum
    self.cfg = self.model_pieces.cfg
    self.layout, self.tx = layout, tx
    self.backward_weights, self.synchronous = backward_weights, synchronous
    self.forward_locked = forward_locked
    self.rng = rng if cfg.dropout_rate else None
    self.clip_norm = clip_norm
    self.weight_prediction = weight_prediction
    self._k = layout.num_modules

  def init(self, params, batch_size: int = 0) -> dict[str, Any]:
    """Cuts the model params into modules; fresh per-module Adam; zero memory per module
    (batch_size: the rows of every batch; needed by models with a memory)."""
    parts = self.model_pieces.split(params)
    modules = []
    for j, (a, b) in enumerate(self.layout.module_ranges()):
      pm = {'layers': pieces.slice_layers(parts['layers'], a, b)}
      if j == 0:
        pm['first'] = parts['first']
      if j == self._k - 1:
        pm['last'] = parts['last']
      modules.append(pm)
    mems = [self.model_pieces.zero_memory(b - a, batch_size)
            for a, b in self.layout.module_ranges()]
    state = dict(step=0, modules=modules, E=parts['E'], mems=mems,
                 opt=[self.tx.init(pm) for pm in modules], opt_E=self.tx.init(parts['E']),
                 saved={}, acts={}, grads={}, batches={})
    if self.weight_prediction or self.nesterov_momentum:   # w^{t-1}: before any update, w^0
      state['prev_modules'] = list(modules)
    if self.delay_compensation:
      state['fwd_weights'] = {}
    if self.error_feedback:
      state['prev_grads'] = [None] * self._k
    return state

  def model_params(self, state):
    """Reassembles the model's params (for evaluation and comparison)."""
    mods = state['modules']
    layers = pieces.concat_layers([m['layers'] for m in mods])
    return self.model_pieces.join(state['E'], mods[0]['first'], layers, mods[-1]['last'])

  def synchronous_at(self, t: int) -> bool:
    """Whether iteration t is synchronous (synchronous=True, or the warm-up t < N)."""
    return self.synchronous or t < self.sync_warmup_steps

  def first_batch(self, t: int) -> int:
    """The oldest batch that exists at iteration t: 0, or N once the pipeline has started
    after a warm-up of N iterations (batches < N trained synchronously)."""
    return 0 if self.synchronous_at(t) else self.sync_warmup_steps

  def fwd_batch(self, j: int, t: int) -> int:
    return t if self.synchronous_at(t) or self.forward_locked else t - j

  def bwd_batch(self, j: int, t: int) -> int:
    if self.synchronous_at(t):
      return t
    if self.forward_locked:
      return t - (self._k - 1 - j)
    return t - self.layout.delay(j) - j

  def delay(self, j: int, t: int) -> int:
    """d_j at iteration t: the iterations from module j's forward of a batch to its
    backward of it (pipelined: 2(K-1-j), forward-locked: K-1-j, synchronous: 0)."""
    return self.fwd_batch(j, t) - self.bwd_batch(j, t)

  def forward_weights(self, state, j: int):
    """Module j's params its forward runs with at this iteration: w_j^t, or extrapolated
    w_j^t + (s d_j + gamma_j) (w_j^t - w_j^{t-1}) (weight prediction,
    `accel.pipeline.prediction`; the Nesterov look-ahead, `remedies.lookahead_steps`)."""
    w = state['modules'][j]
    steps = remedies.lookahead_steps(self.delay(j, state['step']), self.weight_prediction,
                                     self.nesterov_momentum)
    return _predict(w, state['prev_modules'][j], steps) if steps else w

  def key(self, j: int, b: int):
    """Module j's dropout key for batch b (None without dropout)."""
    return pieces.dropout_key(self.rng, b, j)

  def step(self, state, batch):
    """One iteration t: every module's forward and backward, then the updates.

    batch: dict(inputs=[B, L] int, targets=[B, L] int), the batch that enters at t.
    Returns (state, metrics) with metrics['loss'] the loss of batch bwd_batch(K-1, t)
    (None while the pipeline fills), the gradients before clipping ('grads' per module,
    None where it has none; 'grad_E' the tied table's parts) and their global norm.
    """
    k, t, mp = self._k, state['step'], self.model_pieces
    mods, E, mems = state['modules'], state['E'], state['mems']
    saved, acts, grads_in, batches = (state[n] for n in ('saved', 'acts', 'grads', 'batches'))
    batches[t] = batch
    g_mod = [None] * k
    g_E = []
    loss = None
    first = self.first_batch(t)
    # Forwards with the weights w^t of this iteration; each advances its module's memory.
    for j in range(k - 1):
      b = self.fwd_batch(j, t)
      if b < first:
        continue
      x_in = batches[b]['inputs'] if j == 0 else acts.pop((j, b))
      key = self.key(j, b)
      if self.backward_weights == 'stored':
        w = self.forward_weights(state, j)
        y, vjp, new_mem = (_vjp_first(mp, w, E, x_in, mems[j], key) if j == 0
                           else _vjp_middle(mp, w, x_in, mems[j], key))
        saved[(j, b)] = vjp
        if self.delay_compensation and not self.synchronous_at(t):
          state['fwd_weights'][(j, b)] = w
      else:
        y, new_mem = (_fwd_first(mp, mods[j], E, x_in, mems[j], key) if j == 0
                      else _fwd_middle(mp, mods[j], x_in, mems[j], key))
        saved[(j, b)] = (x_in, mems[j])
      acts[(j + 1, b)] = y
      mems[j] = new_mem
    # The last module: forward, loss and backward of the same batch (delay 0).
    b = self.fwd_batch(k - 1, t)
    if b >= first:
      (loss, mems[k - 1]), (g_mod[k - 1], g_E_out, dx) = _grad_last(
          mp, mods[k - 1], E, acts.pop((k - 1, b)), batches[b]['targets'], mems[k - 1],
          self.key(k - 1, b))
      g_E.append(g_E_out)
      grads_in[(k - 2, b)] = dx
    # Backwards of older batches, from the loss side down.
    for j in range(k - 2, -1, -1):
      b = self.bwd_batch(j, t)
      if b < first:
        continue
      g, key = grads_in.pop((j, b)), self.key(j, b)
      if self.backward_weights == 'stored':
        vjp = saved.pop((j, b))
      elif j == 0:
        vjp = _vjp_first(mp, mods[0], E, *saved.pop((0, b)), key)[1]
      else:
        vjp = _vjp_middle(mp, mods[j], *saved.pop((j, b)), key)[1]
      cot = _apply_vjp(vjp, g)
      if j == 0:
        g_mod[0], g_E_in = cot
        g_E.append(g_E_in)
        del batches[b]
      else:
        g_mod[j], grads_in[(j - 1, b)] = cot
    # Tied table: output-side part (batch t-(K-1)) + input-side part (batch t-2(K-1)).
    g_E_sum = sum(g_E[1:], g_E[0]) if g_E else None
    corrected = [g if g is None else self._correct(state, j, g) for j, g in enumerate(g_mod)]
    grad_norm = optax.tree.norm((corrected, g_E_sum))     # None: no gradient, not counted
    applied, applied_E = corrected, g_E_sum
    if self.clip_norm:
      applied, applied_E = clipping.clip((corrected, g_E_sum), grad_norm, self.clip_norm)
    prev = state.get('prev_modules')
    if prev is not None:
      state['prev_modules'] = list(mods)
    # The optimizer per module, only for modules that have a gradient this iteration.
    for j in range(k):
      if applied[j] is not None:
        factor = (remedies.pipemare_factor(t, self.delay(j, t), self.pipemare_steps,
                                           self.sync_warmup_steps)
                  if self.pipemare_steps else 1.0)
        gamma = self.nesterov_momentum * (self.delay(j, t) > 0)
        mods[j], state['opt'][j] = _update(self.tx, applied[j], state['opt'][j], mods[j],
                                           factor, *((prev[j], gamma) if gamma else ()))
    if g_E:
      state['E'], state['opt_E'] = _update(self.tx, applied_E, state['opt_E'], E)
    state['step'] = t + 1
    return state, {'loss': loss, 'grads': g_mod, 'grad_E': g_E, 'grad_norm': grad_norm}

  def _correct(self, state, j: int, g):
    """Module j's gradient g with the remedies' corrections added (`remedies`): DC-ASGD's
    with the weights its forward of the batch ran with, error feedback's with the gradient
    it applied last; records g as that one."""
    t, d = state['step'], self.delay(j, state['step'])
    dc = fb = None
    if self.delay_compensation and j < self._k - 1 and not self.synchronous_at(t):
      w_fwd = state['fwd_weights'].pop((j, self.bwd_batch(j, t)))
      dc = _compensation_term(g, state['modules'][j], w_fwd, self.delay_compensation)
    if self.error_feedback:
      if state['prev_grads'][j] is not None and d:
        fb = _feedback_term(g, state['prev_grads'][j], self.error_feedback * d)
      state['prev_grads'][j] = g
    return g if dc is None and fb is None else _corrected(g, dc, fb)
