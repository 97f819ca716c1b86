"""The single-device Ouroboros reference: layout, zero-delay equivalence, tied gradient,
dropout masks per (batch, module), the global-norm clip."""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from accel.errors import UserError
from accel.models.transformer import TransformerConfig, TransformerLM
from accel.pipeline import pieces
from accel.pipeline.layout import Layout
from accel.pipeline.reference import Reference

CFG = TransformerConfig(vocab_size=32, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                        max_len=8, scan_layers=True)
RNG = jax.random.key(7)   # the train rng the dropout keys derive from


def _params(cfg=CFG, seed=0):
  tok = jnp.zeros((2, cfg.max_len), jnp.int32)
  return TransformerLM(cfg).init(jax.random.key(seed), tok)['params']


def _batches(n, cfg=CFG, b=2, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seq = rng.integers(0, cfg.vocab_size, (b, cfg.max_len + 1)).astype(np.int32)
    out.append({'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:])})
  return out


def _adam(lr):
  """Adam with eps=1e-4: the attention key bias has a gradient that is 0 up to rounding,
  and Adam with a tiny eps turns rounding noise into +-lr steps; a larger eps keeps
  float32-rounding-level differences at rounding level."""
  return optax.adam(lr, eps=1e-4)


def _close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol), a, b)


def _keys(layout, b):
  return [pieces.dropout_key(RNG, b, j) for j in range(layout.num_modules)]


def test_layout_ranges_and_delays():
  tied = Layout(num_layers=6, num_modules=4, tied_ring=True)
  assert tied.num_stages == 3 and tied.layers_per_stage == 2
  assert tied.module_ranges() == ((0, 1), (1, 3), (3, 5), (5, 6))
  assert [tied.stage_of(j) for j in range(4)] == [0, 1, 2, 0]
  assert [tied.delay(j) for j in range(4)] == [6, 4, 2, 0]
  untied = Layout(num_layers=8, num_modules=4, tied_ring=False)
  assert untied.module_ranges() == ((0, 2), (2, 4), (4, 6), (6, 8))
  assert [untied.stage_of(j) for j in range(4)] == [0, 1, 2, 3]
  with pytest.raises(ValueError):
    Layout(num_layers=4, num_modules=4, tied_ring=True)


# K=3 untied, one block per module (E shared by modules 0 and 2), dropout on.
CFG3 = TransformerConfig(**{**CFG.__dict__, 'num_layers': 3, 'dropout_rate': 0.1})
LAYOUT3 = Layout(3, 3, False)
# The whole model's loss and gradient, module j's masks from keys[j] (one compilation).
_value_and_grad3 = jax.jit(jax.value_and_grad(
    lambda p, b, keys: pieces.full_loss(CFG3, p, b['inputs'], b['targets'], LAYOUT3, keys)))


@pytest.mark.parametrize('backward_weights', ['stored', 'recompute'])
def test_zero_delay_equals_synchronous_training(backward_weights):
  """All delays 0, dropout on: per-module vjps + per-module Adam == jax.grad of the whole
  model with module j's masks from dropout_key(rng, b, j) + Adam. The backward of batch b
  ('stored': the vjp as it ran; 'recompute': a re-run from the key) applies the masks of
  its forward, or the gradients would not match."""
  tx = _adam(optax.cosine_decay_schedule(1e-2, 10))
  cfg, layout = CFG3, LAYOUT3
  ref = Reference(cfg, layout, tx, backward_weights, synchronous=True, rng=RNG)
  params = _params(cfg)
  state = ref.init(params)
  opt = tx.init(params)
  grad_fn = _value_and_grad3
  batches = _batches(3)
  b0 = batches[0]
  # Dropout changes the forward: rate 0.1 gives another loss than rate 0 (no masks).
  assert abs(grad_fn(params, b0, _keys(layout, 0))[0]
             - pieces.full_loss(cfg, params, b0['inputs'], b0['targets'])) > 1e-4
  for b, batch in enumerate(batches):
    state, metrics = ref.step(state, batch)
    loss, g = grad_fn(params, batch, _keys(layout, b))
    _, g_other_masks = grad_fn(params, batch, _keys(layout, b + 1))
    assert not np.allclose(g['token_embed']['embedding'],
                           g_other_masks['token_embed']['embedding'], atol=1e-4)
    updates, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
    _close(ref.model_params(state), params)


def test_tied_gradient_is_sum_of_input_and_output_parts():
  """Zero delay, first step: the two parts add up to d loss / d E of the whole model."""
  tx = optax.sgd(0.0)
  ref = Reference(CFG, Layout(CFG.num_layers, 2, True), tx, 'stored', synchronous=True)
  params = _params()
  batch = _batches(1)[0]
  _, metrics = ref.step(ref.init(params), batch)
  g_out, g_in = metrics['grad_E']
  g_full = jax.grad(lambda p: pieces.full_loss(CFG, p, batch['inputs'], batch['targets']))(
      params)['token_embed']['embedding']
  _close(g_out + g_in, g_full)
  # Both parts are non-trivial: the input part only touches rows of the input tokens.
  rows = np.unique(np.asarray(batch['inputs']))
  other = np.setdiff1d(np.arange(CFG.vocab_size), rows)
  assert np.abs(np.asarray(g_in)[other]).max() == 0
  assert np.abs(np.asarray(g_in)[rows]).min() > 0 and np.abs(np.asarray(g_out)).min() > 0


def test_pipelined_schedule_delays():
  """K=3: module j first updates at iteration 2(K-1)-j; losses start at K-1; stored and
  recompute agree on the first backward of each module (weights not yet changed), so the
  delayed re-run draws the masks the forward drew d_j iterations earlier."""
  tx = _adam(1e-2)
  cfg, layout = CFG3, LAYOUT3
  params = _params(cfg)
  batches = _batches(5)
  runs = {}
  for bw in ('stored', 'recompute'):
    ref = Reference(cfg, layout, tx, bw, rng=RNG)
    state = ref.init(params)
    hist = []
    for batch in batches:
      state, m = ref.step(state, batch)
      hist.append(m)
    runs[bw] = hist
  h = runs['stored']
  assert [m['loss'] is None for m in h] == [True, True, False, False, False]
  has_grad = [[g is not None for g in m['grads']] for m in h]
  assert has_grad == [[False] * 3, [False] * 3, [False, False, True],
                      [False, True, True], [True, True, True]]
  # The first backward of module 1 (iteration 3, batch 0) ran its forward at iteration 1,
  # before any update: stored and recompute coincide there...
  _close(runs['stored'][3]['grads'][1], runs['recompute'][3]['grads'][1])
  # ...and differ at iteration 4 (module 1's weights changed at iteration 3).
  d = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                             runs['stored'][4]['grads'][1], runs['recompute'][4]['grads'][1])
  assert max(jax.tree_util.tree_leaves(d)) > 1e-6
  # The loss at iteration K-1 is the loss of batch 0 under the initial weights, with the
  # masks of batch 0 in every module.
  b0 = batches[0]
  np.testing.assert_allclose(
      h[2]['loss'], pieces.full_loss(cfg, params, b0['inputs'], b0['targets'], layout,
                                     _keys(layout, 0)), rtol=1e-6)


@pytest.mark.parametrize('clip_norm', [1e-3, 1e3])
def test_clip_scales_every_gradient_by_the_global_norm(clip_norm):
  """SGD(lr=1) with the clip: each module's step is -g * min(1, c / norm), norm over every
  gradient applied at that iteration (modules of different batches, E's two parts summed;
  during the warm-up only the modules that have one). c = 1e-3 is below every norm, 1e3
  above."""
  ref = Reference(CFG3, LAYOUT3, optax.sgd(1.0), 'recompute', rng=RNG, clip_norm=clip_norm)
  state = ref.init(_params(CFG3))
  scaled = 0
  for batch in _batches(5):
    before = jax.tree_util.tree_map(np.asarray, (state['modules'], state['E']))
    state, m = ref.step(state, batch)
    present = [g for g in m['grads'] if g is not None] + [sum(m['grad_E'])] * bool(m['grad_E'])
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(a), dtype=np.float64))
                       for a in jax.tree_util.tree_leaves(present)))
    np.testing.assert_allclose(m['grad_norm'], norm, rtol=1e-5)
    scale = min(1.0, clip_norm / norm) if norm else 1.0
    scaled += scale < 1
    for j, g in enumerate(m['grads']):
      step = jax.tree_util.tree_map(lambda a, b: a - b, state['modules'][j], before[0][j])
      _close(step, jax.tree_util.tree_map(lambda a: -scale * a, g) if g is not None
             else jax.tree_util.tree_map(np.zeros_like, step), rtol=1e-4, atol=1e-7)
    if m['grad_E']:
      _close(state['E'] - before[1], -scale * sum(m['grad_E']), rtol=1e-4, atol=1e-7)
  assert scaled == (3 if clip_norm < 1 else 0)   # from iteration K-1 = 2 on


def test_spmd_step_runs_in_bfloat16():
  """bf16 compute (float32 parameters): every stage role returns its loss in float32, as
  the spine's loss does, so the roles' outputs agree (the K=2 tied ring: one stage, one
  device)."""
  from accel.pipeline.spmd import Pipeline, make_mesh
  cfg = TransformerConfig(**{**CFG.__dict__, 'dtype': jnp.bfloat16})
  layout = Layout(2, 2, True)
  pipe = Pipeline(cfg, layout, _adam(1e-2), 'stored', make_mesh(1, 1, jax.devices()[:1]))
  state = pipe.init(_params(cfg), 2, cfg.max_len)
  for batch in _batches(2, cfg):
    state, metrics = pipe.step(state, batch)
  assert metrics['loss'].dtype == jnp.float32 and bool(metrics['loss_valid'])
  assert np.isfinite(float(metrics['loss']))
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(state['params']))


@functools.partial(jax.jit, static_argnums=0)
def _grads_of_batch(mp, mods, E_in, E_out, batch):
  """jax.grad of one batch's loss through modules `mods`, E at the lookup and the logits."""
  def loss(mods, E_in, E_out):
    x = mp.embed(E_in, mods[0]['first'], batch['inputs'])
    for m in mods:
      x, _ = mp.blocks(m['layers'], x, None)
    return mp.head_loss(E_out, mods[-1]['last'], x, batch['targets'])
  return jax.grad(loss, argnums=(0, 1, 2))(mods, E_in, E_out)


@pytest.mark.parametrize('forward_locked,prediction,nesterov',
                         [(False, 0.0, 0.0), (True, 0.0, 0.0), (False, 2.0, 0.0),
                          (True, 1.0, 0.0), (False, 1.0, 0.5)])
def test_stored_gradient_is_that_of_the_weights_each_module_ran_with(forward_locked,
                                                                    prediction, nesterov):
  """'stored': every gradient module j applies is jax.grad of its batch b through the
  weights every module had when b passed it, E in module 0's lookup and in the logits
  likewise. Oracle: plain jax.grad of that composed model, no schedule code.
  Pipelined (Ouroboros): b = t - 2(K-1) + j (module K-1: t - (K-1)), module i's weights at
  the start of iteration r = b + i. Forward-locked (DDG): b = t - (K-1-j), every module's
  at r = b. Weight prediction s: module i ran with w_i^r + s d_i (w_i^r - w_i^{r-1}),
  d_i = 2(K-1-i) (forward-locked: K-1-i) and E as it was. The Nesterov momentum gamma
  (`remedies`) adds gamma to s d_i where d_i > 0, and with SGD(eta) its update is Ajanthan
  et al.'s Eq. 10: w^{t+1} = w^t + gamma (w^t - w^{t-1}) - eta (1 - gamma) g (module K-1
  and E: plain SGD)."""
  cfg, layout = TransformerConfig(**{**CFG3.__dict__, 'dropout_rate': 0.0}), LAYOUT3
  k, eta = layout.num_modules, 1e-2
  ref = Reference(cfg, layout, optax.sgd(eta) if nesterov else _adam(eta), 'stored',
                  forward_locked=forward_locked, weight_prediction=prediction,
                  nesterov_momentum=nesterov)
  state = ref.init(_params(cfg))
  batches, snaps, metrics = _batches(2 * k + 1, cfg), [], []
  for batch in batches:
    snaps.append((list(state['modules']), state['E']))   # weights at the start of t
    state, m = ref.step(state, batch)
    metrics.append(m)
  snaps.append((list(state['modules']), state['E']))
  ran_at = (lambda b, i: b) if forward_locked else (lambda b, i: b + i)
  delay = (lambda i: k - 1 - i) if forward_locked else (lambda i: 2 * (k - 1 - i))

  steps = lambda i: prediction * delay(i) + nesterov * (delay(i) > 0)

  def ran_with(i, r):
    w, w_prev = snaps[r][0][i], snaps[max(r - 1, 0)][0][i]
    return jax.tree_util.tree_map(lambda a, p: a + steps(i) * (a - p), w, w_prev)

  def oracle(b):
    return _grads_of_batch(ref.model_pieces, [ran_with(i, ran_at(b, i)) for i in range(k)],
                           snaps[b][1], snaps[ran_at(b, k - 1)][1], batches[b])

  checked = 0
  for t, m in enumerate(metrics):
    for j in range(k):
      b = ref.bwd_batch(j, t) if j < k - 1 else ref.fwd_batch(j, t)
      assert b == (t - (k - 1 - j) if forward_locked else
                   t - (k - 1) if j == k - 1 else t - 2 * (k - 1) + j)
      if b < 0:
        assert m['grads'][j] is None
        continue
      _close(m['grads'][j], oracle(b)[0][j])
      checked += 1
      if nesterov:
        gamma = nesterov * (j < k - 1)
        w, w_prev = snaps[t][0][j], snaps[max(t - 1, 0)][0][j]
        _close(snaps[t + 1][0][j], jax.tree_util.tree_map(
            lambda a, p, g: a + gamma * (a - p) - eta * (1 - gamma) * g, w, w_prev,
            m['grads'][j]))
    b_out, b_in = ref.fwd_batch(k - 1, t), ref.bwd_batch(0, t)
    if b_in >= 0:   # E: the output-side part of b_out plus the input-side part of b_in
      _close(m['grad_E'][0], oracle(b_out)[2])
      _close(m['grad_E'][1], oracle(b_in)[1])
  # every gradient after each module's warm-up (delays 0, 1, 2 or 0, 2, 4 iterations)
  assert checked == (7 + 6 + 5 if forward_locked else 5 + 4 + 3)


def test_weight_prediction_needs_stored_weights():
  with pytest.raises(UserError, match="backward_weights='stored'"):
    Reference(CFG, Layout(2, 2, True), _adam(1e-2), 'recompute', weight_prediction=1.0)


def test_remedies_arithmetic_and_schedule():
  """Each remedy's formula (accel/pipeline/remedies.py) and the warm-up's schedule, on
  numbers (their effect on training, and the SPMD program's agreement: the REMEDIES cases
  of test_pipeline_spmd.py)."""
  from accel import optim
  from accel.pipeline import remedies
  g, w, w_fwd, g_prev = (jnp.asarray(v) for v in ([1.0, -2.0], [0.5, 0.5], [0.0, 1.0],
                                                   [3.0, -1.0]))
  np.testing.assert_allclose(remedies.compensation_term(g, w, w_fwd, 10.0), [5.0, -20.0])
  # error feedback, one c*d per layer of a [2, 2] stack
  np.testing.assert_allclose(remedies.feedback_term(jnp.stack([g, g]), jnp.stack([g_prev] * 2),
                                                    jnp.asarray([0.0, 2.0])),
                             [[0.0, 0.0], [-4.0, -2.0]])
  # PipeMare: lr / tau at the pipeline's start (N = 10), tau^-1/2 halfway through T = 20,
  # the common lr from N + T on and for delay 0
  factor = lambda t, d: float(remedies.pipemare_factor(t, d, 20, 10))
  assert factor(10, 4) == pytest.approx(0.25) and factor(20, 4) == pytest.approx(0.5)
  assert factor(30, 4) == factor(50, 4) == factor(10, 0) == 1.0
  np.testing.assert_allclose(remedies.scale({'a': jnp.ones((2, 3))}, jnp.asarray([1.0, 0.5]))['a'],
                             [[1.0] * 3, [0.5] * 3])
  # Nesterov: w + gamma (w - w_prev) + (1 - gamma) u, one gamma per layer of a [2, 2] stack
  # (0: the plain update); its look-ahead adds gamma to weight prediction's s d where d > 0
  np.testing.assert_allclose(
      remedies.nesterov_update(jnp.stack([w, w]), jnp.stack([g, g]), jnp.stack([w_fwd] * 2),
                               jnp.asarray([0.0, 0.9])),
      [[1.5, -1.5], [0.5 + 0.45 + 0.1, 0.5 - 0.45 - 0.2]], rtol=1e-6)
  assert remedies.lookahead_steps(4, 1.0, 0.5) == 4.5 and remedies.lookahead_steps(0, 1.0, 0.5) == 0
  # the synchronous warm-up: delay 0 before N, the pipeline from empty at N
  ref = Reference(CFG3, LAYOUT3, _adam(1e-2), 'stored', rng=RNG, sync_warmup_steps=3)
  assert [ref.delay(0, t) for t in (0, 2, 3, 9)] == [0, 0, 4, 4]
  assert [ref.first_batch(t) for t in (0, 2, 3, 9)] == [0, 0, 3, 3]
  assert ref.bwd_batch(0, 2) == 2 and ref.bwd_batch(0, 3) == -1 and ref.fwd_batch(1, 3) == 2
  # Muon's matrices: the Dense kernels (a stack's leading axis a batch axis), Adam the rest
  dims = optim.muon_dimension_numbers(_params())
  marked = {jax.tree_util.keystr(p) for p, d in jax.tree_util.tree_leaves_with_path(
      dims, is_leaf=lambda x: x is None or hasattr(x, 'reduction_axis')) if d is not None}
  assert marked == {f"['stack']['layers']['block']{name}['kernel']" for name in
                    ("['attn']['qkv']", "['attn']['out']", "['mlp']['fc_in']",
                     "['mlp']['fc_out']")}


def test_remedy_settings_are_checked():
  from accel.models.transformer_xl import TransformerXLConfig
  with pytest.raises(UserError, match="delay_compensation > 0 needs"):
    Reference(CFG, Layout(2, 2, True), _adam(1e-2), 'recompute', delay_compensation=1.0)
  with pytest.raises(UserError, match='must be >= 0'):
    Reference(CFG, Layout(2, 2, True), _adam(1e-2), 'stored', pipemare_steps=-1)
  with pytest.raises(UserError, match=r'nesterov_momentum must be in \[0, 1\), got 1.0'):
    Reference(CFG, Layout(2, 2, True), _adam(1e-2), 'stored', nesterov_momentum=1.0)
  with pytest.raises(UserError, match="nesterov_momentum > 0 needs"):
    Reference(CFG, Layout(2, 2, True), _adam(1e-2), 'recompute', nesterov_momentum=0.9)
  xl = TransformerXLConfig(vocab_size=32, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                           mem_len=4)
  with pytest.raises(UserError, match='sync_warmup_steps > 0 does not compose'):
    Reference(xl, Layout(2, 2, True), _adam(1e-2), 'stored', sync_warmup_steps=2)
