"""Adaptive softmax (accel.models.adaptive_softmax) against a plain softmax and its formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accel.errors import UserError
from accel.losses import cross_entropy
from accel.models import adaptive_softmax
from accel.models import transformer_xl as txl
from accel.pipeline.pieces_xl import TransformerXLPieces

V, C = 9, 5                      # a head of 5 words and one tail cluster of 4


def _logits(seed=0, shape=(2, 3)):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape + (V,)) * 2, jnp.float32),
          jnp.asarray(rng.normal(size=shape + (1,)), jnp.float32))


def test_one_cluster_with_the_tails_mass_is_the_plain_softmax():
  """A cluster token whose logit is logsumexp of its words gives the cluster exactly the
  mass a plain softmax gives them: p(w) = p(cluster) p(w | cluster) = softmax(z)[w]."""
  z, _ = _logits()
  cluster = jax.nn.logsumexp(z[..., C:], axis=-1, keepdims=True)
  np.testing.assert_allclose(adaptive_softmax.log_probs(z, cluster, (C,)),
                             jax.nn.log_softmax(z), rtol=1e-6, atol=1e-6)


def test_one_cluster_follows_the_formula():
  z, cluster = _logits(1)
  got = np.exp(np.asarray(adaptive_softmax.log_probs(z, cluster, (C,)), np.float64))
  z, cluster = np.asarray(z, np.float64), np.asarray(cluster, np.float64)
  head = np.exp(np.concatenate([z[..., :C], cluster], -1))
  head /= head.sum(-1, keepdims=True)
  tail = np.exp(z[..., C:]) / np.exp(z[..., C:]).sum(-1, keepdims=True)
  np.testing.assert_allclose(got[..., :C], head[..., :C], rtol=1e-5)
  np.testing.assert_allclose(got[..., C:], head[..., C:] * tail, rtol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(got, np.exp(z) / np.exp(z).sum(-1, keepdims=True), rtol=1e-2)


@pytest.mark.parametrize('cutoffs', [(0, 3), (3, 3), (4, V), (5, 2)])
def test_bad_cutoffs(cutoffs):
  with pytest.raises(UserError, match='adaptive_cutoffs'):
    adaptive_softmax.check_cutoffs(cutoffs, V)


def test_transformer_xl_head_and_its_pipeline_piece():
  cfg = txl.TransformerXLConfig(vocab_size=V, num_layers=1, d_model=8, num_heads=2, d_ff=16,
                                mem_len=0, adaptive_cutoffs=(3, 6))
  model = txl.TransformerXL(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 4)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  assert params['adaptive_clusters']['weight'].shape == (2, 8)

  pieces = TransformerXLPieces(cfg)

  def loss(p):
    log_p = model.apply({'params': p}, tokens)
    return cross_entropy(log_p[:, :-1], tokens[:, 1:]).mean(), log_p

  @jax.jit
  def everything(p):
    (_, log_p), grads = jax.value_and_grad(loss, has_aux=True)(p)
    # the pipeline's pieces carry the cluster tokens in `last` and compute the same loss
    parts = pieces.split(p)
    x = pieces.embed(parts['E'], parts['first'], tokens[:, :-1])
    h, _ = pieces.blocks(parts['layers'], x, None)
    piece_loss = pieces.head_loss(parts['E'], parts['last'], h, tokens[:, 1:])
    model_loss = cross_entropy(model.apply({'params': p}, tokens[:, :-1]), tokens[:, 1:])
    return log_p, grads, piece_loss, model_loss.mean()
  log_p, grads, piece_loss, model_loss = everything(params)
  np.testing.assert_allclose(jnp.exp(log_p).sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(grads['adaptive_clusters']['weight']).sum()) > 0
  np.testing.assert_allclose(piece_loss, model_loss, rtol=1e-5)
  assert jax.tree.structure(pieces.join(**pieces.split(params))) == \
      jax.tree.structure(params)
