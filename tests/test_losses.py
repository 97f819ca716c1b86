"""The hand-written cross-entropy against optax's, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from accel.losses import cross_entropy


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
