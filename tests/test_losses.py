"""The hand-written cross-entropy against optax's, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from accel.losses import cross_entropy, cross_entropy_and_hits, softmax_stats


def test_cross_entropy_matches_optax_values_and_gradients():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(k1, (3, 5, 11)) * 3
  labels = jax.random.randint(k2, (3, 5), 0, 11)
  weights = jax.random.uniform(k3, (3, 5))
  optax_ce = optax.softmax_cross_entropy_with_integer_labels

  @jax.jit   # one program for all the values compared (eager dispatch is most of the time)
  def values(logits):
    grads = [jax.grad(lambda z, f=f: (f(z, labels) * weights).sum())(logits)
             for f in (cross_entropy, optax_ce)]
    return cross_entropy(logits, labels), optax_ce(logits, labels), *grads
  loss, ref, grad, grad_ref = values(logits)
  np.testing.assert_allclose(loss, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_bf16_logits_give_float32_loss_and_bf16_gradient():
  logits = jax.random.normal(jax.random.key(1), (4, 7)).astype(jnp.bfloat16)
  labels = jnp.arange(4)
  ref_ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z.astype(jnp.float32),
                                                                      labels)

  @jax.jit
  def values(logits):
    return (cross_entropy(logits, labels), ref_ce(logits),
            jax.grad(lambda z: cross_entropy(z, labels).mean())(logits),
            jax.grad(lambda z: ref_ce(z).mean())(logits))
  loss, ref, grad, grad_ref = values(logits)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad.astype(jnp.float32), grad_ref.astype(jnp.float32),
                             atol=1e-2)


def test_one_pass_logsumexp_and_argmax_equal_the_two_pass_ones():
  """The online (max, sum) reduction gives logsumexp to float32 rounding and the argmax
  exactly, ties (bf16 logits rounded to integers) to the lowest index as jnp.argmax, -inf
  logits (a masked vocabulary) included; the loss of cross_entropy_and_hits and its gradient
  are cross_entropy's."""
  k1, k2 = jax.random.split(jax.random.key(2))
  logits = (jax.random.normal(k1, (6, 5, 37)) * 4).at[0, :, :9].set(-jnp.inf)
  labels = jax.random.randint(k2, (6, 5), 9, 37)
  squared = lambda f: lambda z: (f(z, labels) ** 2).sum()

  @jax.jit
  def both(z):   # one program: the one-pass values, then the references
    return ((softmax_stats(z, with_argmax=True), cross_entropy_and_hits(z, labels),
             jax.grad(squared(lambda *a: cross_entropy_and_hits(*a)[0]))(z)),
            (jax.nn.logsumexp(z.astype(jnp.float32), -1), z.argmax(-1),
             cross_entropy(z, labels), jax.grad(squared(cross_entropy))(z)))
  for z in (logits, jnp.round(logits).astype(jnp.bfloat16)):
    ((lse, argmax), (loss, hits), grads), (lse_ref, argmax_ref, loss_ref, grads_ref) = both(z)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-6)
    np.testing.assert_array_equal(argmax, argmax_ref)
    np.testing.assert_array_equal(hits, argmax_ref == labels)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    np.testing.assert_array_equal(grads, grads_ref)
  assert int((jnp.round(logits) == jnp.round(logits).max(-1, keepdims=True)).sum(-1).max()) > 1
  np.testing.assert_array_equal(softmax_stats(jnp.full((2, 3), -jnp.inf))[0], -jnp.inf)
