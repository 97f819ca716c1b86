"""Transformer-XL: rel-shift, relative attention and recurrence against an explicit reference.

The reference below computes every attention score one (query, key) pair at a time,
score = ((q_i + u) . k_j + (q_i + v) . W_r R[d]) / sqrt(K) with d the query-key distance and
R[d] = [sin(d w), cos(d w)] built from that distance alone, over an arbitrary visibility
mask; so it needs neither the rel-shift nor the memory bookkeeping of the model.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accel.errors import UserError
from accel.models import transformer_xl as txl

V, N, D, H, F, M, L, B = 11, 2, 8, 2, 16, 3, 4, 2


def _cfg(pre_ln):
  return txl.TransformerXLConfig(vocab_size=V, num_layers=N, d_model=D, num_heads=H, d_ff=F,
                                 mem_len=M, pre_ln=pre_ln)


@functools.cache
def _setup(pre_ln, seed=0):
  """(cfg, model, params, tokens [B, 2L], memory, jitted segment(params, tokens, mems))."""
  cfg = _cfg(pre_ln)
  model = txl.TransformerXL(cfg)
  rng = np.random.default_rng(seed)
  tokens_BxS = jnp.asarray(rng.integers(0, V, (B, 2 * L)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(seed), tokens_BxS[:, :L])['params']
  # Non-trivial LayerNorm parameters, biases and memory, so that no term can hide.
  params = jax.tree_util.tree_map(
      lambda x: np.asarray(x + 0.1 * rng.normal(size=x.shape), np.float32), params)
  mems_NxBxMxD = jnp.asarray(rng.normal(size=(N, B, M, D)), jnp.float32)
  segment = jax.jit(lambda p, t, m: model.apply({'params': p}, t, m, method='segment'))
  return cfg, model, params, tokens_BxS, mems_NxBxMxD, segment


# ---------------------------------------------------------------- explicit reference (numpy)

def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _sin(d):
  inv = 1.0 / (10000.0 ** (np.arange(0, D, 2) / D))
  return np.concatenate([np.sin(d * inv), np.cos(d * inv)])


def _ref_layer(p, ext_BxExD, m, visible_SxE, pre_ln):
  """One layer over E = m + S key positions; queries are the last S."""
  k = D // H
  a = p['attn']
  x_BxSxD = ext_BxExD[:, m:]
  inp = _ln(ext_BxExD, p['ln1']) if pre_ln else ext_BxExD
  q = (inp[:, m:] @ a['q']['kernel']).reshape(B, -1, H, k)
  kv = inp @ a['kv']['kernel']
  key, val = kv[..., :D].reshape(B, -1, H, k), kv[..., D:].reshape(B, -1, H, k)
  s, e = visible_SxE.shape
  scores = np.full((B, H, s, e), -np.inf)
  for i in range(s):
    for j in range(e):
      if visible_SxE[i, j]:
        r_HxK = (_sin(m + i - j) @ a['r']['kernel']).reshape(H, k)
        scores[:, :, i, j] = (np.einsum('bhk,bhk->bh', q[:, i] + a['u'], key[:, j]) +
                              np.einsum('bhk,hk->bh', q[:, i] + a['v'], r_HxK)) / math.sqrt(k)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bhse,behk->bshk', probs, val).reshape(B, s, D) @ a['out']['kernel']
  f = p['ff']

  def ff(h):
    return (np.maximum(h @ f['fc_in']['kernel'] + f['fc_in']['bias'], 0) @
            f['fc_out']['kernel'] + f['fc_out']['bias'])
  if pre_ln:
    h = x_BxSxD + out
    return h + ff(_ln(h, p['ln2']))
  h = _ln(x_BxSxD + out, p['ln1'])
  return _ln(h + ff(h), p['ln2'])


def _reference(params, tokens_BxS, mems_NxBxMxD, visible_SxE, pre_ln):
  """Logits and every layer's input [N, B, S, D] over the whole sequence."""
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  mems = np.asarray(mems_NxBxMxD, np.float64)
  table = params['token_embed']['embedding']
  x = table[np.asarray(tokens_BxS)] * math.sqrt(D)
  inputs = []
  for n in range(N):
    layer = jax.tree_util.tree_map(lambda a, n=n: a[n], params['stack']['layers']['block'])
    inputs.append(x)
    x = _ref_layer(layer, np.concatenate([mems[n], x], axis=1), M, visible_SxE, pre_ln)
  if pre_ln:
    x = _ln(x, params['final_ln'])
  return x @ table.T + params['out_bias']['bias'], np.stack(inputs)


def _visible(s, segment):
  """Query p sees keys q (q = -M..s-1) with q <= p and q >= (start of p's segment) - M."""
  p = np.arange(s)[:, None]
  q = np.arange(-M, s)[None, :]
  return (q <= p) & (q >= (p // segment) * segment - M)


# ---------------------------------------------------------------- tests

def test_rel_shift_aligns_distances():
  x_2xLxT = np.random.default_rng(0).normal(size=(2, L, M + L)).astype(np.float32)
  out = np.asarray(txl.rel_shift(jnp.asarray(x_2xLxT)))
  for i in range(L):
    for j in range(M + i + 1):          # the entries the causal mask keeps
      np.testing.assert_array_equal(out[:, i, j], x_2xLxT[:, i, j + L - 1 - i])


@pytest.mark.parametrize('pre_ln', [False, True])
def test_segment_matches_explicit_relative_attention(pre_ln):
  cfg, model, params, tokens, mems, segment = _setup(pre_ln)
  logits, new_mems = segment(params, tokens[:, :L], mems)
  ref_logits, ref_inputs = _reference(params, tokens[:, :L], mems, _visible(L, L), pre_ln)
  assert logits.shape == (B, L, V) and new_mems.shape == (N, B, M, D)
  np.testing.assert_allclose(logits, ref_logits, rtol=2e-5, atol=2e-5)
  # next memory of layer n = the last M of [mem_n ; input_n]
  expected = np.concatenate([np.asarray(mems), ref_inputs], axis=2)[:, :, -M:]
  np.testing.assert_allclose(new_mems, expected, rtol=2e-5, atol=2e-5)
  assert params['stack']['layers']['block']['attn']['u'].shape == (N, H, D // H)


def test_two_segments_with_memory_equal_one_windowed_pass():
  """seg2 after seg1 == the 2L concatenation where position p sees keys back to the start of
  its own segment minus M (the recurrence window), computed without any memory tensors."""
  cfg, model, params, tokens, mems0, segment = _setup(pre_ln=False, seed=1)
  logits1, mems1 = segment(params, tokens[:, :L], mems0)
  logits2, mems2 = segment(params, tokens[:, L:], mems1)
  ref_logits, ref_inputs = _reference(params, tokens, mems0, _visible(2 * L, L), False)
  np.testing.assert_allclose(np.concatenate([logits1, logits2], 1), ref_logits,
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(mems2, ref_inputs[:, :, -M:], rtol=2e-5, atol=2e-5)
  # and the window matters: a full causal pass over 2L gives other seg2 logits
  full_logits, _ = _reference(params, tokens, mems0,
                              np.arange(-M, 2 * L)[None] <= np.arange(2 * L)[:, None], False)
  assert np.abs(full_logits[:, L:] - ref_logits[:, L:]).max() > 1e-3


def test_future_tokens_do_not_change_the_past():
  cfg, model, params, tokens, mems, segment = _setup(pre_ln=True)
  seg = tokens[:, :L]
  other = np.asarray(seg).copy()
  other[:, 2] = (other[:, 2] + 1) % V
  a, mem_a = segment(params, seg, mems)
  b, mem_b = segment(params, other, mems)
  np.testing.assert_array_equal(a[:, :2], b[:, :2])
  assert np.abs(a[:, 2:] - b[:, 2:]).min() > 0
  # memory slots of layer inputs at positions < 2 (slot M - L + p) are unchanged too
  np.testing.assert_array_equal(mem_a[:, :, :M - L + 2], mem_b[:, :, :M - L + 2])


def test_no_gradient_flows_into_memory():
  cfg, model, params, tokens, mems0, segment = _setup(pre_ln=False, seed=2)

  def loss_of_seg2(p, mems1):
    logits, _ = segment(p, tokens[:, L:], mems1)
    return jnp.sum(logits ** 2)

  def through_seg1(p):
    _, mems1 = segment(p, tokens[:, :L], mems0)
    return loss_of_seg2(p, mems1)

  def memory_path(p, g_mem):
    x = model.apply({'params': p}, tokens[:, :L], method='embed')
    return jnp.sum(g_mem[0] * jnp.concatenate([mems0[0], x], axis=1)[:, -M:])

  @jax.jit
  def gradients(p):
    _, mems1 = segment(p, tokens[:, :L], mems0)
    g_mem = jax.grad(loss_of_seg2, argnums=1)(p, mems1)
    return (jax.grad(through_seg1)(p), jax.grad(loss_of_seg2)(p, mems1),
            jax.grad(memory_path)(p, g_mem))
  g_through, g_constant, g_missing = gradients(params)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731
  jax.tree_util.tree_map(close, g_through, g_constant)
  # Without stop_gradient, g_through would gain (at least) the path through layer 0's
  # memory: d/dE of <dloss/dmem_0, [mem0_0 ; embed_E(seg1)][-M:]>, which is far from 0.
  assert np.abs(g_missing['token_embed']['embedding']).max() > 1e-2


def test_embed_layer_ranges_and_head_compose_to_the_model():
  cfg, model, params, tokens, mems, segment = _setup(pre_ln=True)
  layers = params['stack']['layers']
  piece = lambda a, b: jax.tree_util.tree_map(lambda t: t[a:b], layers)  # noqa: E731

  head = {k: params[k] for k in ('token_embed', 'out_bias', 'final_ln')}

  @jax.jit
  def whole_and_pieces(p, tokens_BxL, mems):
    # each piece gets only its own parameters, as a pipeline stage would
    x = model.apply({'params': {'token_embed': p['token_embed']}}, tokens_BxL, method='embed')
    h1, new1 = txl.run_layers(cfg, piece(0, 1), x, mems[0:1])
    h2, new2 = txl.run_layers(cfg, piece(1, N), h1, mems[1:N])
    logits = model.apply({'params': head}, h2, method='logits')
    return (model.apply({'params': p}, tokens_BxL, mems, method='segment'),
            (logits, jnp.concatenate([new1, new2])))
  (whole, new), (logits, new12) = whole_and_pieces(params, tokens[:, :L], mems)
  # equal up to float32 rounding (XLA fuses a length-1 scan differently)
  np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new12, new, rtol=1e-6, atol=1e-6)


def test_call_keeps_memory_in_mutable_collection():
  cfg, model, params, tokens, _, segment = _setup(pre_ln=False)
  @jax.jit
  def calls(p, tokens_BxS):
    initial = model.init(jax.random.key(0), tokens_BxS[:, :L])['mems']
    logits, updated = model.apply({'params': p, 'mems': initial}, tokens_BxS[:, :L],
                                  train=True, mutable=['mems'])
    logits2 = model.apply({'params': p, **updated}, tokens_BxS[:, L:])
    return initial, logits, updated, logits2
  initial, logits, updated, logits2 = calls(params, tokens)
  np.testing.assert_array_equal(initial['memory']['hidden'], np.zeros((N, B, M, D)))
  ref_logits, ref_mems = segment(params, tokens[:, :L], txl.zero_memory(cfg, B))
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updated['mems']['memory']['hidden'], ref_mems, rtol=1e-6, atol=1e-6)
  # without 'mems' mutable the stored memory is read, not written
  ref2, _ = segment(params, tokens[:, L:], ref_mems)
  np.testing.assert_allclose(logits2, ref2, rtol=1e-6, atol=1e-6)


def test_task_carries_memory_in_training_and_across_eval_rows():
  """The task's train loss returns the next memory; evaluation scores the rows of a batch as
  consecutive segments (row r sees row r-1's memory), memory zero before row 0."""
  from accel import config_lib, methods, tasks
  from accel.data import input_pipeline
  cfg, model, params, tokens, _, segment = _setup(pre_ln=False)
  config = config_lib.base_config()
  config.model.name, config.data.order, config.data.seq_len = 'transformer_xl', 'contiguous', L
  info = input_pipeline.DatasetInfo('lm', vocab_size=cfg.vocab_size)
  build = lambda: tasks.TASKS['transformer_xl', 'lm'](config, info, model, methods.Enabled(config))
  task = build()
  batch = {'inputs': tokens[:, :L], 'targets': tokens[:, 1:L + 1]}
  mutable = {'mems': {'memory': {'hidden': txl.zero_memory(cfg, B)}}}

  @jax.jit
  def run(p, mutable, batch):
    _, (_, new_mutable) = task.loss(p, mutable, batch, jax.random.key(0), True)
    return new_mutable, task.evaluate(p, mutable, batch)
  new_mutable, metrics = run(params, mutable, batch)
  _, expected_mems = segment(params, tokens[:, :L], txl.zero_memory(cfg, B))
  np.testing.assert_allclose(new_mutable['mems']['memory']['hidden'], expected_mems,
                             rtol=1e-6, atol=1e-6)
  mems, losses = txl.zero_memory(cfg, 1), []
  for r in range(B):
    logits, mems = segment(params, tokens[r:r + 1, :L], mems)
    logp = jax.nn.log_softmax(logits[0])
    losses.append(-logp[np.arange(L), tokens[r, 1:L + 1]])
  np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-5)
  config.data.order = 'shuffled'
  with pytest.raises(UserError, match='contiguous'):
    build()
  config.data.order, config.layerdrop.enabled = 'contiguous', True
  with pytest.raises(UserError, match='layerdrop'):
    build()


def test_no_memory_state_when_mem_len_is_zero():
  """M = 0 keeps no 'mems' collection (an empty array cannot be checkpointed)."""
  model = txl.TransformerXL(dataclasses.replace(_cfg(False), mem_len=0))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B, L), jnp.int32))
  assert set(variables) == {'params'}
