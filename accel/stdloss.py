"""Standardization loss (Collins, Ballé, Shlens 2019, arXiv 1903.00925; papers.md section 4).

For a layer's pre-activation x, per channel i, with mean mu_i and variance sigma_i^2 over
the batch (and spatial) axes:

    L(x) = 1/2 * sum_i (mu_i^2 + sigma_i^2 - log sigma_i^2 - 1)
         = sum_i KL(N(mu_i, sigma_i^2) || N(0, 1)),

summed over the chosen layers and added to the task loss with weight lambda during
training only. No normalization layer, no reparameterization: the model is unchanged.

Moments in one pass. With K_i a sample of channel i (its first element, gradient stopped),

    a_i = mean(x_i - K_i),  b_i = mean((x_i - K_i)^2),  mu_i = K_i + a_i,
    sigma_i^2 = max(b_i - a_i^2, 0),

so the activation is read by two sums of the same input (one kernel where XLA fuses them
with each other and with the layer's elementwise consumer) and the gradient,
dL/dx = (dL/dmu + 2 dL/dsigma^2 (x - mu)) / N, is one elementwise pass, which fuses into
the layer's own backward: no reduction over the activation in the backward (the two-pass
form mean((x - mu)^2) had one more there, through mu). The shift keeps the cancellation of
E[x^2] - mu^2 away: b - a^2 loses precision only as (mu - K)^2 / sigma^2, a few units for
a K drawn from the channel itself (a constant channel gives sigma^2 = 0 exactly).

Numerical safety. The moments are taken in float32 (or float64) from the activation in its
own dtype; sigma_i^2 is never negative (the clamp above); and sigma_i^2 is replaced by
v_i = sigma_i^2 + eps everywhere in the formula, i.e. the KL of N(mu_i, sigma_i^2 + eps)
from N(0, 1). It stays >= 0, is 0 at sigma_i^2 = 1 - eps, and for a constant channel
(dead unit, sigma^2 = 0) it is finite, log(1/eps)/2 + ..., with dL/dv bounded by
1/(2 eps) instead of 1/(2 sigma^2) -> inf.

Which layers. `capture` runs any Flax linen apply function under `nn.intercept_methods`
and takes the output of every `nn.Dense`/`nn.DenseGeneral`/`nn.Conv` `__call__` whose
module path ('/'-joined names, e.g. 'stage0_block1_conv0' or 'stack/layers/block_0/mlp/fc_in')
matches the regex `layers` and not the regex `exclude`. Defaults: every Dense and Conv
except the classifier named 'logits' (`accel.models.cnn`), which is exactly the layers
that feed a nonlinearity in the MLP and CNN; in the ResNet it includes the second conv of
each block and the projection shortcut, which feed relu through the residual sum. For the
Transformer only 'fc_in' feeds a nonlinearity: set `layers='fc_in$'`. The interceptor
returns each output unchanged, so the model's outputs are bitwise those of a plain apply.
A chosen layer inside a lifted transform that traces its body (nn.scan, nn.remat, nn.cond:
the Transformer with scan_layers or remat) cannot hand its output out of that transform's
trace (its scope was created under another JAX trace than the outermost module's, which is
how it is detected). For such a layer `capture` either raises LiftedLayerError or, given a
weight, passes the output through an identity whose backward adds weight * dL/dy to the
cotangent: the parameters get exactly the gradient of weight * L, but L's value and the
layer's statistics are not available. `nn.map_variables` traces nothing: the unrolled
Transformer blocks, and the kept blocks of layer dropping, are captured directly.

Training (`METHOD.wrap_apply`, through `accel.methods.Enabled` in `accel.tasks.Task.apply`):
with `config.stdloss.enabled`, the model's training apply runs under `capture` and the task loss gets
`stdloss.weight` * the summed layer losses; metrics 'stdloss/loss' (unweighted) and the
layers' averages 'stdloss/mean_abs_mu' and 'stdloss/mean_var' come with every step (the
loop logs them every `log_every` steps); `stdloss.layer_metrics` adds per layer
'stdloss/<path>/mean_abs_mu' and '.../mean_var' (two scalars a layer, which cost step time
on a GPU: `metrics`). Layers inside lifted transforms get
the gradient only (above): they are counted in 'stdloss/gradient_only_layers' and are not
in 'stdloss/loss' nor in the logged train loss. Evaluation (train=False) runs the plain
apply: no capture, no term.

Under the Ouroboros pipeline (`wrap_blocks`, `accel.pipeline.hooks`) every stage's blocks
run under `gradient_only`: each chosen layer gets the gradient of weight * L, in the fresh
backward of the loss-side module and in every delayed one alike ('stored': the moments of
the forward's own outputs, kept among its vjp residuals; 'recompute': of the re-run's).
No value is reported: a stage's forwards run inside jax.vjp / jax.checkpoint, which hand out
only their outputs, and each module's term would be of another batch (module j forwards
batch t-j), so their sum is no loss of any one batch. Moments: 'global' averages them over
the 'data' shards of the batch a stage is running (`lax.pmean` inside the shard_map, the
same batch on every shard of a stage), 'per_device' takes each data shard's own rows.

Moments under data parallelism (`num_shards`). The train step is one `jax.jit` over a
batch sharded along its first axis. `num_shards=1` computes the moments from the whole,
globally sharded batch (XLA all-reduces the per-channel sums): global moments, as
synchronized batch norm. `num_shards=n` splits the batch axis into n contiguous groups,
which under an n-way batch sharding are exactly the n devices' local batches, computes
moments and the loss per group and averages the n losses: per-device moments, as the
paper did per TPU core. `config.stdloss.moments`: 'global' | 'per_device'
(num_shards = jax.device_count(), the size of accel.train's 'data' mesh). Inside
`jax.shard_map`, `standardization_loss(axis_name=...)` gives global moments by
`lax.pmean` over that mesh axis: mu = pmean(mu_d), sigma^2 = pmean(sigma_d^2 + (mu_d - mu)^2)
from each device's one-pass moments (mu_d, sigma_d^2).
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accel.errors import UserError
from accel.method import DATA_PARALLEL, PIPELINE, Method

EPS = 1e-5
CAPTURED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _moments(x, reduce_axes: Sequence[int], num_shards: int, axis_name: str | None):
  """Per-channel (mu, sigma^2), at least float32, with a leading shard axis (num_shards).

  One pass over x: with K a per-channel sample of x (its first element in each shard,
  gradient stopped), a = mean(x - K) and b = mean((x - K)^2) are sibling reductions of
  one read, and mu = K + a, sigma^2 = max(b - a^2, 0).
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  axes = tuple(a % x.ndim for a in reduce_axes)
  if 0 not in axes:
    raise ValueError(f'reduce_axes {tuple(reduce_axes)} must include the batch axis 0')
  if x.shape[0] % num_shards:
    raise ValueError(f'batch {x.shape[0]} is not divisible by num_shards {num_shards}')
  x = x.reshape(num_shards, x.shape[0] // num_shards, *x.shape[1:])
  axes = tuple(a + 1 for a in axes)
  first = tuple(slice(0, 1) if d in axes else slice(None) for d in range(x.ndim))
  shift = lax.stop_gradient(x[first]).astype(dtype)
  d = x.astype(dtype) - shift
  a = jnp.mean(d, axes, keepdims=True)
  b = jnp.mean(jnp.square(d), axes, keepdims=True)
  mu, var = shift + a, jnp.maximum(b - jnp.square(a), 0.0)
  if axis_name is not None:
    mu_global = lax.pmean(mu, axis_name)
    var = lax.pmean(var + jnp.square(mu - mu_global), axis_name)
    mu = mu_global
  squeeze = lambda m: m.squeeze(axes).reshape(num_shards, -1)
  return squeeze(mu), squeeze(var)


def _loss_from_moments(mu_SxC, var_SxC, eps, mask_C=None):
  """Mean over shards (axis -2) of 1/2 sum_c (mu^2 + v - log v - 1); leading axes kept.
  mask_C: 0 where a channel is padding (layers of other widths stacked)."""
  v = var_SxC + eps
  terms = jnp.square(mu_SxC) + v - jnp.log(v) - 1.0
  if mask_C is not None:
    terms = terms * mask_C
  return jnp.mean(0.5 * jnp.sum(terms, axis=-1), axis=-1)


def standardization_loss(x: jax.Array, reduce_axes: Sequence[int] | None = None, *,
                         eps: float = EPS, num_shards: int = 1,
                         axis_name: str | None = None) -> jax.Array:
  """1/2 * sum_i (mu_i^2 + v_i - log v_i - 1), v_i = sigma_i^2 + eps, for one array.

  x: pre-activations, batch first. reduce_axes: the axes the moments run over (batch and
  spatial); the others index channels i. Default: all but the last axis.
  num_shards: moments per contiguous batch group, losses averaged (per-device moments).
  axis_name: inside shard_map, moments averaged over this mesh axis (global moments).
  """
  if reduce_axes is None:
    reduce_axes = tuple(range(x.ndim - 1))
  return _loss_from_moments(*_moments(x, reduce_axes, num_shards, axis_name), eps)


class LayerStats(NamedTuple):
  """One captured layer: its loss term and, without gradient, mean |mu| and mean sigma^2."""
  loss: jax.Array
  mean_abs_mu: jax.Array
  mean_var: jax.Array


class _Partial(NamedTuple):
  """One layer's moments before their last reduction: per shard s and example g of it,
  the sums over the other reduced axes of d = x - K and d^2 (count elements each)."""
  shift_SxC: jax.Array
  a_SxGxC: jax.Array
  b_SxGxC: jax.Array
  count: int                      # elements per channel and shard


def _layer_moments(x, num_shards) -> _Partial:
  """x's one-pass shifted sums over all axes but the last, short of the sum over the
  batch: that one is taken for all captured layers at once (`_stats_of_layers`), so the
  per-layer kernels are the sums fused with the layer's consumer and nothing more."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if x.shape[0] % num_shards:
    raise ValueError(f'batch {x.shape[0]} is not divisible by num_shards {num_shards}')
  x_SxGxPxC = x.reshape(num_shards, x.shape[0] // num_shards, -1, x.shape[-1])
  shift_SxC = lax.stop_gradient(x_SxGxPxC[:, 0, 0, :]).astype(dtype)
  d = x_SxGxPxC.astype(dtype) - shift_SxC[:, None, None, :]
  return _Partial(shift_SxC, jnp.sum(d, 2), jnp.sum(jnp.square(d), 2),
                  x_SxGxPxC.shape[1] * x_SxGxPxC.shape[2])


def _stats_of_layers(partials: list[_Partial], eps) -> list[LayerStats]:
  """LayerStats of layers from their `_Partial` sums, computed stacked: the layers'
  channels padded to the widest, so the batch sums, moments and per-layer scalars of the
  whole model are a few kernels, not a few per layer (on a GPU the step's many small
  kernels are what it waits for: results/stdloss_gpu_profile.md)."""
  widths = np.array([p.shift_SxC.shape[-1] for p in partials])
  width = int(widths.max())
  if len({p.a_SxGxC.shape[:2] for p in partials}) > 1:   # batch axes differ: sum each first
    partials = [p._replace(a_SxGxC=p.a_SxGxC.sum(1, keepdims=True),
                           b_SxGxC=p.b_SxGxC.sum(1, keepdims=True)) for p in partials]
  pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
  stack = lambda field: jnp.stack([pad(getattr(p, field)) for p in partials])
  count_Lx1x1 = np.array([p.count for p in partials], np.float32)[:, None, None]
  a_LxSxC = stack('a_SxGxC').sum(2) / count_Lx1x1
  b_LxSxC = stack('b_SxGxC').sum(2) / count_Lx1x1
  mu_LxSxC = stack('shift_SxC') + a_LxSxC
  var_LxSxC = jnp.maximum(b_LxSxC - jnp.square(a_LxSxC), 0.0)
  mask_Lx1xC = (np.arange(width) < widths[:, None])[:, None, :]
  var_LxSxC = jnp.where(mask_Lx1xC, var_LxSxC, 1.0)
  loss_L = _loss_from_moments(mu_LxSxC, var_LxSxC, eps, mask_Lx1xC)
  count_L = widths * mu_LxSxC.shape[1]
  mean_abs_mu_L = lax.stop_gradient(jnp.sum(jnp.abs(mu_LxSxC) * mask_Lx1xC, (1, 2)) / count_L)
  mean_var_L = lax.stop_gradient(jnp.sum(var_LxSxC * mask_Lx1xC, (1, 2)) / count_L)
  return [LayerStats(loss_L[i], mean_abs_mu_L[i], mean_var_L[i]) for i in range(len(widths))]


class LiftedLayerError(ValueError):
  """A chosen layer runs inside a Flax lifted transform that traces its body."""


def _loss_gradient_identity(weight: float, eps: float, num_shards: int,
                            axis_name: str | None = None):
  """y -> y, whose backward adds weight * dL(y)/dy to y's cotangent.

  Upstream parameters then get exactly the gradient of weight * L(y), without L's value
  ever leaving the trace it was computed in (so it works inside nn.cond / remat / scan,
  and in a pipeline stage's delayed vjp).
  axis_name: inside shard_map, y is one shard of the batch along this mesh axis and the
  moments are averaged over it (global moments); the cotangent added is n * dL/dy_shard
  for n shards, because the caller averages the shards' parameter gradients (pmean).
  """
  @jax.custom_vjp
  def identity(y):
    return y

  def fwd(y):
    return y, y

  def bwd(y, g):
    if axis_name is None:
      dloss_dy = jax.grad(lambda y: _stats_of_layers([_layer_moments(y, num_shards)],
                                                     eps)[0].loss)(y)
    else:
      dloss_dy = lax.psum(1, axis_name) * jax.grad(lambda y: standardization_loss(
          y, eps=eps, num_shards=num_shards, axis_name=axis_name))(y)
    return (g + (weight * dloss_dy).astype(g.dtype),)

  identity.defvjp(fwd, bwd)
  return identity


def _chooser(layers: str, exclude: str) -> Callable[[Any], str | None]:
  """context -> the '/'-joined path of the intercepted module if it is a chosen layer (a
  Dense/DenseGeneral/Conv __call__ whose path matches `layers` and not `exclude`), else None."""
  include_re = re.compile(layers)
  exclude_re = re.compile(exclude) if exclude else None

  def chosen(context):
    if context.method_name != '__call__' or not isinstance(context.module, CAPTURED_TYPES):
      return None
    path = '/'.join(context.module.path)
    if not include_re.search(path) or (exclude_re and exclude_re.search(path)):
      return None
    return path
  return chosen


def gradient_only(fn: Callable[..., Any], *, weight: float, layers: str = '',
                  exclude: str = 'logits$', eps: float = EPS, num_shards: int = 1,
                  axis_name: str | None = None) -> Callable[..., Any]:
  """`fn` (any function that calls linen modules) with every chosen layer's output (as
  `capture` chooses them) through `_loss_gradient_identity`: the parameters get the
  gradient of weight * L summed over those layers, and L's value stays in the trace.

  For the pipeline's stages (`StandardizationLoss.wrap_blocks`): their forwards run inside
  jax.vjp and jax.checkpoint, whose intermediates leave only as the vjp's outputs.
  Raises UserError if fn calls Dense/Conv layers and chooses none.
  """
  chosen = _chooser(layers, exclude)
  identity = _loss_gradient_identity(weight, eps, num_shards, axis_name)

  def wrapped(*args, **kwargs):
    seen = {'layers': 0, 'chosen': 0}

    def interceptor(next_fun, call_args, call_kwargs, context):
      y = next_fun(*call_args, **call_kwargs)
      seen['layers'] += (context.method_name == '__call__'
                         and isinstance(context.module, CAPTURED_TYPES))
      if chosen(context) is None:
        return y
      seen['chosen'] += 1
      return identity(y)

    with nn.intercept_methods(interceptor):
      out = fn(*args, **kwargs)
    if seen['layers'] and not seen['chosen']:
      raise UserError(f'stdloss.layers={layers!r} (exclude={exclude!r}) matches no Dense or '
                      'Conv layer of the model')
    return out

  return wrapped


def capture(fn: Callable[..., Any], *, layers: str = '', exclude: str = 'logits$',
            eps: float = EPS, num_shards: int = 1, lifted_weight: float | None = None,
            lifted_paths: set[str] | None = None
            ) -> Callable[..., tuple[Any, dict[str, LayerStats]]]:
  """Wraps a linen apply `fn`; the wrapped one returns (fn's output, {path: LayerStats}).

  A layer is captured if it is a Dense/DenseGeneral/Conv, its '/'-joined module path
  matches `layers` (re.search; '' matches all) and does not match `exclude` ('' excludes
  none). A module called k > 1 times gets keys 'path', 'path#1', ... The moments run
  over all axes but the last (channels).
  A chosen layer inside a tracing lifted transform raises LiftedLayerError, unless
  `lifted_weight` is given: then its output goes through `_loss_gradient_identity`
  (the gradient of lifted_weight * L, no value, no LayerStats) and its path is added to
  `lifted_paths`.
  """
  chosen = _chooser(layers, exclude)

  def wrapped(*args, **kwargs):
    moments: dict[str, _Partial] = {}
    top_trace = []   # the JAX trace the outermost module's scope was created in

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      if not top_trace:
        top_trace.append(module.scope.trace_level)
      y = next_fun(*call_args, **call_kwargs)
      path = chosen(context)
      if path is None:
        return y
      if module.scope.trace_level != top_trace[0]:
        if lifted_weight is None:
          raise LiftedLayerError(f'layer {path} runs inside a lifted transform (nn.scan, '
                                 'nn.remat, nn.cond); its output cannot leave it')
        if lifted_paths is not None:
          lifted_paths.add(path)
        return _loss_gradient_identity(lifted_weight, eps, num_shards)(y)
      key, k = path, 0
      while key in moments:
        k += 1
        key = f'{path}#{k}'
      moments[key] = _layer_moments(y, num_shards)
      return y

    with nn.intercept_methods(interceptor):
      out = fn(*args, **kwargs)
    if not moments:
      return out, {}
    return out, dict(zip(moments, _stats_of_layers(list(moments.values()), eps)))

  return wrapped


def total_loss(captured: dict[str, LayerStats]) -> jax.Array:
  """Sum of the captured layers' loss terms (0.0 if none)."""
  return sum((s.loss for s in captured.values()), jnp.zeros((), jnp.float32))


def metrics(captured: dict[str, LayerStats], per_layer: bool = False) -> dict[str, jax.Array]:
  """'stdloss/loss' (unweighted), 'stdloss/mean_abs_mu' and 'stdloss/mean_var' (means over
  the captured layers) and, with per_layer, 'stdloss/<path>/{mean_abs_mu,mean_var}'.

  Per layer is off by default: on a GPU every scalar the train step returns costs time
  (ResNet-32, 31 layers, one H200: 1.110x the un-normalized step with them, 1.082x
  without, results/stdloss_gpu_layer_metrics.md)."""
  out = {'stdloss/loss': total_loss(captured)}
  if captured:
    out['stdloss/mean_abs_mu'] = jnp.mean(jnp.stack([s.mean_abs_mu for s in captured.values()]))
    out['stdloss/mean_var'] = jnp.mean(jnp.stack([s.mean_var for s in captured.values()]))
  if per_layer:
    for path, s in captured.items():
      out[f'stdloss/{path}/mean_abs_mu'] = s.mean_abs_mu
      out[f'stdloss/{path}/mean_var'] = s.mean_var
  return out


class StandardizationLoss(Method):
  """The method: the model's training apply under `capture`, lambda * L added to the loss.

  Metrics as `metrics` plus 'stdloss/gradient_only_layers' (chosen layers inside lifted
  transforms, whose term enters the gradient only). Evaluation runs the plain apply.
  Under the pipeline, every stage's blocks run under `gradient_only` (`wrap_blocks`).
  """
  block = 'stdloss'
  layouts = (DATA_PARALLEL, PIPELINE)

  def check(self, config) -> None:
    cfg = config.stdloss
    if cfg.moments not in ('global', 'per_device'):
      raise UserError(f"stdloss.moments must be 'global' or 'per_device', got {cfg.moments!r}")
    try:
      re.compile(cfg.layers)
      re.compile(cfg.exclude)
    except re.error as e:
      raise UserError(f'stdloss.layers / stdloss.exclude: bad regular expression ({e})') from e

  def wrap_apply(self, config, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    cfg = config.stdloss
    num_shards = jax.device_count() if cfg.moments == 'per_device' else 1

    def wrapped(*args, **kwargs):
      lifted: set[str] = set()
      out, captured = capture(apply_fn, layers=cfg.layers, exclude=cfg.exclude,
                              num_shards=num_shards, lifted_weight=cfg.weight,
                              lifted_paths=lifted)(*args, **kwargs)
      if not captured and not lifted:
        raise UserError(f'stdloss.layers={cfg.layers!r} (exclude={cfg.exclude!r}) matches '
                        'no Dense or Conv layer of the model')
      std_metrics = metrics(captured, per_layer=cfg.layer_metrics)
      std_metrics['stdloss/gradient_only_layers'] = jnp.asarray(len(lifted), jnp.float32)
      return out, cfg.weight * total_loss(captured), std_metrics

    return wrapped

  def wrap_blocks(self, config, blocks_fn, data_axis):
    """Gradient only; inside the pipeline's shard_map (data_axis) 'global' averages the
    moments over the data shards of the stage's batch, 'per_device' keeps each shard's."""
    cfg = config.stdloss
    per_device = cfg.moments == 'per_device'
    if data_axis is None:
      num_shards, axis_name = (jax.device_count() if per_device else 1), None
    else:
      num_shards, axis_name = 1, (None if per_device else data_axis)
    return gradient_only(blocks_fn, weight=cfg.weight, layers=cfg.layers,
                         exclude=cfg.exclude, num_shards=num_shards, axis_name=axis_name)


METHOD = StandardizationLoss()
