"""Weights, gradients and optimizer state in a 16-bit format, no float32 master copy
(Wang et al. 2018, papers.md section 3): the update is rounded stochastically.

  g   = rnd_fmt(grad / loss_scale)            (nearest)
  u, s' = inner.update(g, s, w)               s' rounded into state_fmt (stochastic)
  w'  = rnd_fmt(w + u)                        (stochastic: E[w'] = w + u)

An update much smaller than the spacing of `fmt` around w is lost by round-to-nearest
(training stalls); stochastic rounding keeps it on average.

As an optax transformation placed last, it returns d = w' - w for `optax.apply_updates`
to add back in float32. Both w and w' in fmt (p significant bits), d is exact, and
w + d == w', unless their exponents lie more than 24 - p apart (an update cancelling w
to below ~2^(p-24)|w|, or one ~2^(24-p) times larger than w): start from parameters
already in fmt (`round_to_format`), or the float32 leftovers of the initial values
keep d inexact.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from accel.lowprec.formats import FloatFormat, get_format, quantize


class LowPrecState(NamedTuple):
  inner: optax.OptState
  count: jax.Array


def _round_tree(tree, fmt: FloatFormat, rounding: str, key: jax.Array):
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, leaf in enumerate(leaves):
    if hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating):
      leaf = quantize(leaf, fmt, rounding, jax.random.fold_in(key, i)).astype(leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def lowprec_updates(inner: optax.GradientTransformation, fmt: str | FloatFormat = 'e6m9',
                    state_fmt: str | FloatFormat | None = None, rounding: str = 'stochastic',
                    loss_scale: float = 1.0, seed: int = 0
                    ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so parameters, gradients and its state stay in `fmt` (module docstring).

  state_fmt: format of the inner state (default fmt); rounding: of the weight update and
  state ('stochastic' or 'nearest'); loss_scale: the factor the gradients arrive multiplied
  by (see `scale_gradient`), divided out first.
  The stochastic rounding draws from fold_in(seed, count), then per leaf. `update(...,
  stream=i)` folds in i as well: a caller that updates tensors one at a time with the same
  state structure (the pipeline's per-layer vmap, `accel.pipeline.spmd.update`) gives each
  its own i, or they would all draw the same bits.
  """
  fmt = get_format(fmt)
  state_fmt = get_format(state_fmt or fmt)
  base = jax.random.key(seed)

  def init(params):
    return LowPrecState(inner.init(params), jnp.zeros((), jnp.int32))

  def update(grads, state, params=None, *, stream=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('lowprec_updates needs params')
    key = jax.random.fold_in(base, state.count)
    if stream is not None:
      key = jax.random.fold_in(key, stream)
    k_state, k_params = jax.random.split(key)
    grads = jax.tree.map(lambda g: quantize(g / loss_scale, fmt).astype(g.dtype), grads)
    updates, inner_state = inner.update(grads, state.inner, params)
    inner_state = _round_tree(inner_state, state_fmt, rounding, k_state)
    new_params = _round_tree(jax.tree.map(lambda p, u: p + u, params, updates), fmt, rounding,
                             k_params)
    deltas = jax.tree.map(lambda new, p: (new - p).astype(p.dtype), new_params, params)
    return deltas, LowPrecState(inner_state, state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


def round_to_format(params, fmt: str | FloatFormat = 'e6m9'):
  """Floating leaves of `params` rounded to fmt (nearest): the starting point of
  `lowprec_updates`."""
  fmt = get_format(fmt)
  return jax.tree.map(lambda x: quantize(x, fmt).astype(x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


@jax.custom_vjp
def _scale_gradient(x, scale):
  return x


def _scale_fwd(x, scale):
  return x, scale


def _scale_bwd(scale, g):
  return jax.tree.map(lambda t: t * scale.astype(t.dtype), g), jnp.zeros_like(scale)


_scale_gradient.defvjp(_scale_fwd, _scale_bwd)


def scale_gradient(x, scale: float):
  """Identity whose backward multiplies the cotangent by `scale`: loss scaling applied at
  the model output, so every backward GEMM sees the scaled errors while the reported loss
  is unchanged. `lowprec_updates(loss_scale=scale)` divides it out of the gradients."""
  if scale == 1.0:
    return x
  return _scale_gradient(x, jnp.float32(scale))
