"""Ouroboros on Transformer-XL: with zero delay the reference is segment training.

Every module keeps the recurrence memory of its own layers; with all delays 0
(`synchronous=True`) the per-module vjps, per-module Adam and per-module memories must equal
jax.grad of the whole model with the memory carried from step to step (accel/tasks/segment_lm.py),
(PostLN; the PreLN head runs in tests/test_pipeline_spmd.py's 'txl_preln' case, where the
SPMD program is checked against this reference).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from accel.losses import cross_entropy
from accel.models import transformer_xl as txl
from accel.models.transformer import TransformerConfig
from accel.pipeline import families, pieces
from accel.pipeline.layout import Layout
from accel.pipeline.reference import Reference


def _close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol), a, b)


def test_zero_delay_equals_segment_training():
  cfg = txl.TransformerXLConfig(vocab_size=32, num_layers=4, d_model=16, num_heads=2,
                                d_ff=32, mem_len=4)
  model = txl.TransformerXL(cfg)
  b, l = 2, 8
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((b, l), jnp.int32))['params']
  tx = optax.adam(1e-2, eps=1e-4)   # see test_pipeline_reference._adam
  # K=3 tied ring: modules of 1, 2, 1 layers; E and the output bias shared by 0 and 2.
  ref = Reference(cfg, Layout(4, 3, tied_ring=True), tx, 'recompute', synchronous=True)
  state = ref.init(params, b)

  def loss_fn(p, mems, batch):
    logits, new_mems = model.apply({'params': p}, batch['inputs'], mems, method='segment')
    return cross_entropy(logits, batch['targets']).mean(), new_mems
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  update = jax.jit(lambda g, opt, p: tx.update(g, opt, p))
  opt, mems = tx.init(params), txl.zero_memory(cfg, b)
  rng = np.random.default_rng(1)
  for _ in range(3):
    seq = rng.integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    batch = {'inputs': jnp.asarray(seq[:, :-1]), 'targets': jnp.asarray(seq[:, 1:])}
    state, metrics = ref.step(state, batch)
    (loss, mems), g = grad_fn(params, mems, batch)
    updates, opt = update(g, opt, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
    _close(ref.model_params(state), params)
    # The modules' memories, stacked, are the model's memory (and it is not zero).
    _close(pieces.concat_layers(state['mems']), mems)
    assert float(jnp.abs(mems).max()) > 0


def test_pieces_draw_dropout_from_the_key():
  """Embedding, blocks and head drop with a key (the same masks for the same key, which the
  delayed backward relies on) and run deterministically without one."""
  cfg = txl.TransformerXLConfig(vocab_size=32, num_layers=2, d_model=16, num_heads=2,
                                d_ff=32, mem_len=4, dropout_rate=0.1)
  mp = families.for_config(cfg)
  tokens = jnp.ones((2, 8), jnp.int32)
  parts = mp.split(jax.jit(mp.init_params)(jax.random.key(0), tokens))

  @jax.jit
  def module_outputs(key):
    x = mp.embed(parts['E'], parts['first'], tokens, key)
    h, _ = mp.blocks(parts['layers'], x, mp.zero_memory(2, 2), key)
    return x, h, mp.head_loss(parts['E'], parts['last'], h, tokens, key)
  plain = module_outputs(None)
  for key in (jax.random.key(1), jax.random.key(2)):
    dropped = module_outputs(key)
    _close(module_outputs(key), dropped, rtol=0, atol=0)
    for a, b in zip(plain, dropped):
      assert float(jnp.abs(a - b).max()) > 1e-4


def test_module_masks_do_not_depend_on_how_it_is_cut():
  """Both families: a module run as blocks [0, 1) then [1, 3) (first_layer=1), as the SPMD
  program's segments do, draws the masks of one call over all 3 blocks (block i: layer_key
  of the module's key and i), and a run from block 0 draws other ones."""
  common = dict(vocab_size=32, num_layers=3, d_model=16, num_heads=2, d_ff=32,
                dropout_rate=0.1)
  tokens = jnp.ones((2, 8), jnp.int32)
  key = jax.random.key(3)
  for cfg in (TransformerConfig(max_len=8, **common), txl.TransformerXLConfig(mem_len=4, **common)):
    mp = families.for_config(cfg)
    layers = mp.split(jax.jit(mp.init_params)(jax.random.key(0), tokens))['layers']
    mem = mp.zero_memory(3, 2)
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    cut = lambda m, a, b: None if m is None else m[a:b]

    @jax.jit
    def whole_and_cut(x):
      whole = mp.blocks(layers, x, mem, key)
      h, m0 = mp.blocks(pieces.slice_layers(layers, 0, 1), x, cut(mem, 0, 1), key)
      h, m1 = mp.blocks(pieces.slice_layers(layers, 1, 3), h, cut(mem, 1, 3), key, 1)
      from_0 = mp.blocks(pieces.slice_layers(layers, 1, 3), x, cut(mem, 1, 3), key)[0]
      from_1 = mp.blocks(pieces.slice_layers(layers, 1, 3), x, cut(mem, 1, 3), key, 1)[0]
      return whole, (h, None if mem is None else jnp.concatenate([m0, m1])), from_0, from_1
    whole, pieced, from_0, from_1 = whole_and_cut(x)
    _close(pieced, whole, rtol=0, atol=1e-6)
    assert float(jnp.abs(from_0 - from_1).max()) > 1e-4
