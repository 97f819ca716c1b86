"""16-bit weights and optimizer state with stochastic rounding in the update."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from accel.lowprec import formats as F
from accel.lowprec import optimizer as O


def _run(tx, params, grad_fn, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_params_and_adam_state_stay_representable():
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
            'b': jnp.asarray(rng.standard_normal(8) * 1e-3, jnp.float32)}
  target = jax.tree.map(lambda p: p + 0.1, params)
  grad_fn = jax.grad(lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p))
  for fmt in (F.E6M9, F.BF16):
    tx = O.lowprec_updates(optax.adam(1e-2), fmt, seed=1)
    out, state = _run(tx, O.round_to_format(params, fmt), grad_fn, 5)
    for leaf in jax.tree.leaves(out) + jax.tree.leaves(state.inner):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert bool(jnp.all(F.is_representable(leaf, fmt))), fmt
    assert int(state.count) == 5
    assert float(jnp.abs(out['w'] - params['w']).mean()) > 0.03   # it did move


def test_stochastic_rounding_keeps_updates_nearest_loses_them():
  """SGD towards t = 1.01 from w = 1 with steps of ~2e-4, a tenth of the e6m9 spacing
  2^-9 at 1: nearest rounding never moves, stochastic rounding gets there on average."""
  w0 = jnp.ones((512,), jnp.float32)
  grad_fn = jax.grad(lambda w: jnp.sum((w - 1.01) ** 2))
  sgd = optax.sgd(0.01)
  near, _ = _run(O.lowprec_updates(sgd, 'e6m9', rounding='nearest'), w0, grad_fn, 300)
  sr, _ = _run(O.lowprec_updates(sgd, 'e6m9', rounding='stochastic'), w0, grad_fn, 300)
  fp32, _ = _run(sgd, w0, grad_fn, 300)
  assert np.all(np.asarray(near) == 1.0)
  assert abs(float(sr.mean()) - float(fp32.mean())) < 5e-4
  assert abs(float(fp32.mean()) - 1.01) < 1e-3


def test_loss_scale_is_divided_out():
  w0 = jnp.asarray(np.linspace(-1, 1, 64), jnp.float32)
  loss = lambda w, s: jnp.sum(O.scale_gradient(w * 3.0, s) ** 2) / 2
  g_scaled = jax.grad(loss)(w0, 1024.0)
  np.testing.assert_array_equal(g_scaled, 1024.0 * jax.grad(loss)(w0, 1.0))
  assert float(loss(w0, 1024.0)) == float(loss(w0, 1.0))
  tx1 = O.lowprec_updates(optax.sgd(0.1), 'e6m9', rounding='nearest', loss_scale=1024.0)
  tx0 = O.lowprec_updates(optax.sgd(0.1), 'e6m9', rounding='nearest')
  u1, _ = tx1.update(g_scaled, tx1.init(w0), w0)
  u0, _ = tx0.update(jax.grad(loss)(w0, 1.0), tx0.init(w0), w0)
  np.testing.assert_array_equal(u1, u0)


def test_each_stream_rounds_with_its_own_bits():
  """Tensors updated one at a time under vmap with the same state structure (the
  pipeline's per-layer update) draw their own bits through `stream`; no stream is the
  plain key fold_in(seed, count)."""
  w_LxN = jnp.ones((2, 256), jnp.float32)
  g_LxN = jnp.full((2, 256), -0.01, jnp.float32)   # steps of 1e-4, a twentieth of the spacing at 1
  tx = O.lowprec_updates(optax.sgd(0.01), 'e6m9', rounding='stochastic', seed=3)

  @jax.jit    # one compile, not one per eager op
  def updates(g_LxN, w_LxN):
    update = lambda g, w, stream: tx.update(g, tx.init(w), w, stream=stream)[0]
    own_LxN = jax.vmap(update)(g_LxN, w_LxN, jnp.arange(2))
    shared_LxN = jax.vmap(lambda g, w: tx.update(g, tx.init(w), w)[0])(g_LxN, w_LxN)
    return own_LxN, shared_LxN, tx.update(g_LxN[0], tx.init(w_LxN[0]), w_LxN[0])[0]

  u_LxN, shared_LxN, plain_N = updates(g_LxN, w_LxN)
  assert not np.array_equal(u_LxN[0], u_LxN[1])
  np.testing.assert_array_equal(shared_LxN[0], shared_LxN[1])
  np.testing.assert_array_equal(shared_LxN[0], plain_N)
