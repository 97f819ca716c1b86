"""The Ouroboros 'stored' schedule as one pure, jittable single-device step, for studies.

`Reference` ('stored') applies at iteration t, for module j, the gradient of batch
b = t - 2(K-1) + j (module K-1: b = t - (K-1)) through the forward that every module ran b
with: module i at iteration b + i, with its forward weights w_hat_i^{b+i} (w_i, or
predicted, `prediction`), the tied table E^b in module 0's lookup and E^{b+K-1} in the
logits. So the whole gradient of batch b is known at iteration b + K-1, when the loss-side
module runs it: this step takes it there at once, with jax.grad of the composed model whose
module i reads its weights from a ring of the last K-1 iterations' forward weights, and
keeps module j's part in a queue for the K-1-j iterations until it is applied (E's
input-side part: K-1). The remedies (`remedies`) and the clip act as in `Reference`.
Same arithmetic as `Reference(backward_weights='stored')` to float32 rounding
(tests/test_pipeline_reference.py), but one compiled program whose state is a pytree of
arrays: `jax.vmap` trains runs side by side, `lax.scan` many steps per call.

The knobs that differ between runs are arrays in the state (`Knobs`), so runs of one shape
share a program: the synchronous warm-up N (N >= the run's length: synchronous training),
the weight-prediction scale s, DC-ASGD's lambda, the error-feedback c, PipeMare's T, the
Nesterov momentum gamma and a factor on the learning rate. A synchronous iteration (t < N)
takes the gradient of batch t at w^t and applies it at once; a pipelined one (t >= N) that
of batch t - (K-1) at the ringed weights, valid once that batch is >= N.

Memory beyond synchronous training: K-1 copies of the weights (forward ring), the queued
gradients (sum over j of K-1-j module gradients, with DC-ASGD each with its forward
weights), w^{t-1} and the last gradient of each module (always kept here: one layout for
every knob). Compute: one forward and backward of the whole model per iteration, as
synchronous training; no model with a recurrence memory.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import optax

from accel.errors import UserError
from accel.pipeline import clipping, families, pieces, prediction, remedies
from accel.pipeline.layout import Layout

_tmap = jax.tree_util.tree_map


@dataclasses.dataclass(frozen=True)
class Knobs:
  """Per-run settings, 0 = off (`remedies`); N = 2**30: synchronous throughout."""
  sync_warmup_steps: int = 0
  weight_prediction: float = 0.0
  delay_compensation: float = 0.0
  error_feedback: float = 0.0
  pipemare_steps: int = 0
  nesterov_momentum: float = 0.0
  lr_scale: float = 1.0

  def arrays(self) -> dict:
    return {f.name: jnp.asarray(getattr(self, f.name),
                                jnp.int32 if f.type in (int, 'int') else jnp.float32)
            for f in dataclasses.fields(self)}


SYNCHRONOUS = 2 ** 30


def _shift(ring, new):
  """A shift register [depth, ...]: `new` at index 0, the oldest entry dropped."""
  return _tmap(lambda r, v: jnp.concatenate([v[None], r[:-1]]), ring, new)


def _where(mask, new, old):
  return _tmap(lambda a, b: jnp.where(mask, a, b), new, old)


class Simulated:
  """Ouroboros 'stored' on one device; `init(params, knobs)`, `step(state, batch)`."""

  def __init__(self, cfg, layout: Layout, tx: optax.GradientTransformation, rng=None,
               clip_norm: float = 0.0):
    """tx must not clip (clip_norm: `accel.pipeline.clipping`); rng: the train rng of the
    dropout keys (`pieces.dropout_key(rng, b, j)`, as `Reference`)."""
    self.model_pieces = families.for_config(cfg)
    if self.model_pieces.has_memory:
      raise UserError('the single-device schedule step has no recurrence memory '
                      '(model.name=transformer_xl)')
    if cfg.dropout_rate and rng is None:
      raise ValueError('dropout_rate > 0 needs the rng its masks derive from')
    self.layout, self.tx, self.clip_norm = layout, tx, clip_norm
    self.rng = rng if cfg.dropout_rate else None
    self._k = layout.num_modules
    self._grad = jax.value_and_grad(self._batch_loss, argnums=(0, 1, 2))

  # ------------------------------------------------------------------------------ state
  def init(self, params, batch, knobs: Knobs = Knobs()):
    """batch: any batch of the run's shape (dict(inputs, targets) [B, L])."""
    k, mp = self._k, self.model_pieces
    parts = mp.split(params)
    modules = []
    for j, (a, b) in enumerate(self.layout.module_ranges()):
      pm = {'layers': pieces.slice_layers(parts['layers'], a, b)}
      if j == 0:
        pm['first'] = parts['first']
      if j == k - 1:
        pm['last'] = parts['last']
      modules.append(pm)
    E, depth = parts['E'], k - 1
    ring = lambda tree, n: _tmap(lambda a: jnp.zeros((n,) + a.shape, a.dtype), tree)
    zeros = lambda tree: _tmap(jnp.zeros_like, tree)
    return {'step': jnp.zeros((), jnp.int32), 'knobs': knobs.arrays(),
            'modules': modules, 'E': E,
            'opt': [self.tx.init(pm) for pm in modules], 'opt_E': self.tx.init(E),
            'prev_modules': modules,
            'fwd_ring': ring(modules, depth), 'E_ring': ring(E, depth),
            'token_ring': ring(batch, depth),
            'queues': [ring({'g': pm, 'w_fwd': pm}, k - 1 - j)
                       for j, pm in enumerate(modules[:-1])],
            'E_in_queue': ring(E, depth),
            'prev_grads': zeros(modules), 'has_prev': jnp.zeros((k,), bool)}

  def model_params(self, state):
    mods = state['modules']
    layers = pieces.concat_layers([m['layers'] for m in mods])
    return self.model_pieces.join(state['E'], mods[0]['first'], layers, mods[-1]['last'])

  # ------------------------------------------------------------------------------- step
  def _batch_loss(self, mods, E_in, E_out, batch, b):
    mp = self.model_pieces
    keys = [pieces.dropout_key(self.rng, b, j) for j in range(self._k)]
    x = mp.embed(E_in, mods[0]['first'], batch['inputs'], keys[0])
    for m, key in zip(mods, keys):
      x, _ = mp.blocks(m['layers'], x, None, key)
    return mp.head_loss(E_out, mods[-1]['last'], x, batch['targets'], keys[-1])

  def step(self, state, batch):
    """One iteration t; batch: the batch that enters at t. Returns (state, metrics):
    'loss' of the batch whose gradient was taken (valid: 'loss_valid'), 'grad_norm' of the
    gradients applied, before clipping."""
    k, t, kn = self._k, state['step'], state['knobs']
    n = kn['sync_warmup_steps']
    sync = t < n
    mods, E = state['modules'], state['E']
    delays = [jnp.where(sync, 0, self.layout.delay(j)) for j in range(k)]
    gammas = [kn['nesterov_momentum'] * (d > 0) for d in delays]
    # Forward weights of iteration t: w, or extrapolated along the last update (weight
    # prediction, the Nesterov look-ahead).
    w_hat = [prediction.predict(mods[j], state['prev_modules'][j], remedies.lookahead_steps(
        delays[j], kn['weight_prediction'], kn['nesterov_momentum'])) for j in range(k)]
    # The batch whose gradient is taken: t (synchronous) or t-(K-1), with module j's
    # forward weights of iteration b + j (ring lag K-1-j) and E^b at the lookup.
    def lagged(j):
      lag = k - 1 - j
      return w_hat[j] if lag == 0 else _tmap(lambda r: r[lag - 1], state['fwd_ring'][j])
    used = [_where(sync, w_hat[j], lagged(j)) for j in range(k)]
    E_in = _where(sync, E, _tmap(lambda r: r[k - 2], state['E_ring']))
    old_batch = _tmap(lambda r: r[k - 2], state['token_ring'])
    grad_batch = _where(sync, batch, old_batch)
    b = jnp.where(sync, t, t - (k - 1))
    loss, (g_used, g_E_in, g_E_out) = self._grad(used, E_in, E, grad_batch, b)
    first = jnp.where(sync, 0, n)
    loss_valid = b >= first
    # What each module applies at t: fresh when synchronous (and module K-1), else queued.
    g_mod, valid, w_fwd = [], [], []
    for j in range(k):
      if j == k - 1:
        g_mod.append(g_used[j])
        valid.append(loss_valid)
        w_fwd.append(used[j])
        continue
      out = _tmap(lambda r: r[-1], state['queues'][j])
      g_mod.append(_where(sync, g_used[j], out['g']))
      w_fwd.append(_where(sync, used[j], out['w_fwd']))
      valid.append(sync | (t - 2 * (k - 1) + j >= first))
    g_E_in_applied = _where(sync, g_E_in, _tmap(lambda r: r[-1], state['E_in_queue']))
    E_in_valid = sync | (t - 2 * (k - 1) >= first)
    # Corrections (`remedies`): DC-ASGD with the forward weights, error feedback.
    corrected, prev_grads = [], []
    for j in range(k):
      g = g_mod[j]
      dc = remedies.compensation_term(g, mods[j], w_fwd[j], kn['delay_compensation'])
      fb_on = state['has_prev'][j] & (delays[j] > 0)
      fb = remedies.feedback_term(g, state['prev_grads'][j],
                                  jnp.where(fb_on, kn['error_feedback'] * delays[j], 0.0))
      corrected.append(remedies.add(g, dc, fb))
      prev_grads.append(_where(valid[j], g, state['prev_grads'][j]))
    g_E = remedies.add(_tmap(lambda a: jnp.where(loss_valid, a, 0.0), g_E_out),
                       _tmap(lambda a: jnp.where(E_in_valid, a, 0.0), g_E_in_applied))
    E_valid = loss_valid | E_in_valid
    masked = [_tmap(lambda a: jnp.where(v, a, 0.0), g) for g, v in zip(corrected, valid)]
    grad_norm = optax.tree.norm((masked, g_E))
    if self.clip_norm:
      masked, g_E = clipping.clip((masked, g_E), grad_norm, self.clip_norm)
    # The optimizer per module where it has a gradient; PipeMare's factor and the lr scale.
    new_mods, new_opt = [], []
    for j in range(k):
      factor = kn['lr_scale'] * jnp.where(
          kn['pipemare_steps'] > 0,
          remedies.pipemare_factor(t, delays[j], jnp.maximum(kn['pipemare_steps'], 1), n),
          1.0)
      p, o = self._update(masked[j], state['opt'][j], mods[j], factor,
                          state['prev_modules'][j], gammas[j])
      new_mods.append(_where(valid[j], p, mods[j]))
      new_opt.append(_where(valid[j], o, state['opt'][j]))
    E_new, opt_E = self._update(g_E, state['opt_E'], E, kn['lr_scale'])
    new_state = {
        'step': t + 1, 'knobs': kn, 'modules': new_mods,
        'E': jnp.where(E_valid, E_new, E), 'opt': new_opt,
        'opt_E': _where(E_valid, opt_E, state['opt_E']), 'prev_modules': mods,
        'fwd_ring': _shift(state['fwd_ring'], w_hat), 'E_ring': _shift(state['E_ring'], E),
        'token_ring': _shift(state['token_ring'], batch),
        'queues': [_shift(q, {'g': g_used[j], 'w_fwd': used[j]})
                   for j, q in enumerate(state['queues'])],
        'E_in_queue': _shift(state['E_in_queue'], g_E_in),
        'prev_grads': prev_grads,
        'has_prev': state['has_prev'] | jnp.stack(valid)}
    return new_state, {'loss': loss, 'loss_valid': loss_valid, 'grad_norm': grad_norm}

  def _update(self, grads, opt_state, params, factor, prev=None, gamma=0.0):
    """The optimizer's update scaled by factor; with prev (w^{t-1}) the Nesterov step of
    momentum gamma (`remedies.nesterov_update`; gamma = 0: the plain update)."""
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return remedies.apply_update(params, updates, factor, prev, gamma), opt_state
