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
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(cross_entropy(logits, labels), ref, rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda z: (cross_entropy(z, labels) * weights).sum())(logits)
  grad_ref = jax.grad(lambda z: (optax.softmax_cross_entropy_with_integer_labels(z, labels)
                                 * weights).sum())(logits)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_bf16_logits_give_float32_loss_and_bf16_gradient():
  logits = jax.random.normal(jax.random.key(1), (4, 7)).astype(jnp.bfloat16)
  labels = jnp.arange(4)
  loss = cross_entropy(logits, labels)
  assert loss.dtype == jnp.float32
  ref = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  grad = jax.grad(lambda z: cross_entropy(z, labels).mean())(logits)
  assert grad.dtype == jnp.bfloat16
  grad_ref = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z.astype(jnp.float32), labels).mean())(logits)
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
  for z in (logits, jnp.round(logits).astype(jnp.bfloat16)):
    (lse, argmax), (loss, hits), grads = jax.jit(lambda z: (
        softmax_stats(z, with_argmax=True), cross_entropy_and_hits(z, labels),
        jax.grad(lambda z: (cross_entropy_and_hits(z, labels)[0] ** 2).sum())(z)))(z)
    z32 = z.astype(jnp.float32)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(z32, -1), rtol=1e-6)
    np.testing.assert_array_equal(argmax, z.argmax(-1))
    np.testing.assert_array_equal(hits, z.argmax(-1) == labels)
    np.testing.assert_allclose(loss, cross_entropy(z, labels), rtol=1e-6)
    ref = jax.grad(lambda z: (cross_entropy(z, labels) ** 2).sum())(z)
    np.testing.assert_array_equal(grads, ref)
  assert int((jnp.round(logits) == jnp.round(logits).max(-1, keepdims=True)).sum(-1).max()) > 1
  np.testing.assert_array_equal(softmax_stats(jnp.full((2, 3), -jnp.inf))[0], -jnp.inf)
