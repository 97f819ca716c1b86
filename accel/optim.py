"""optax optimizers and learning-rate schedules from `config.optimizer`.

schedule(t): linear warm-up from 0 to `lr` over `warmup_steps`, then
  constant | cosine (to lr * end_lr_fraction at total_steps) | linear (same end) |
  exponential (lr * decay_rate ** ((t - warmup) / decay_steps)).
optimizer.name = 'muon': Muon at `lr` on the Dense kernels, Adam at `adam_lr` (0: lr) on the
rest, both on the schedule's shape; `muon_beta` its momentum.
"""
from __future__ import annotations

import jax
import optax

from accel.errors import UserError

OPTIMIZERS = ('adamw', 'adam', 'sgd', 'rmsprop', 'muon')
SCHEDULES = ('constant', 'cosine', 'linear', 'exponential')


def build_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = opt_cfg.lr, opt_cfg.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  end = lr * opt_cfg.end_lr_fraction
  name = opt_cfg.schedule
  if name == 'constant':
    after = optax.constant_schedule(lr)
  elif name == 'cosine':
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_cfg.end_lr_fraction)
  elif name == 'linear':
    after = optax.linear_schedule(lr, end, decay_steps)
  elif name == 'exponential':
    after = optax.exponential_decay(lr, opt_cfg.decay_steps, opt_cfg.decay_rate)
  else:
    raise UserError(f'unknown optimizer.schedule {name!r}; known: {", ".join(SCHEDULES)}')
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def muon_dimension_numbers(params):
  """Muon's matrices: every Dense 'kernel' leaf, as [..., fan_in, fan_out] (the leading
  axes, e.g. a stack of layers, are batch axes: each layer's matrix is orthogonalised on
  its own); every other leaf (embeddings, position table, biases, norms) None: Adam."""
  spec = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: spec if (path and getattr(path[-1], 'key', None) == 'kernel'
                                  and leaf.ndim >= 2) else None, params)


def muon(lr, adam_lr, beta: float, b1: float, b2: float, eps: float
         ) -> optax.GradientTransformation:
  """optax.contrib.muon (Jordan et al. 2024, modded-nanogpt: momentum beta, Nesterov,
  orthogonalised by 5 Newton-Schulz steps) on the Dense kernels at learning rate `lr`,
  Adam(b1, b2, eps) at `adam_lr` on the rest (`muon_dimension_numbers`)."""
  if not hasattr(optax, 'contrib') or not hasattr(optax.contrib, 'muon'):
    raise UserError(f'optimizer.name=muon needs optax.contrib.muon (optax {optax.__version__})')
  return optax.contrib.muon(lr, beta=beta, eps=eps, adam_b1=b1, adam_b2=b2,
                            adam_learning_rate=adam_lr,
                            muon_weight_dimension_numbers=muon_dimension_numbers)


def build_optimizer(opt_cfg, total_steps: int, clip: bool = True
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip=False leaves out optax.clip_by_global_norm(opt_cfg.clip_norm), for a caller
  that clips over more than the gradients this tx sees (`accel.pipeline.clipping`)."""
  schedule = build_schedule(opt_cfg, total_steps)
  name = opt_cfg.name
  if name == 'adamw':
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                     weight_decay=opt_cfg.weight_decay)
  elif name == 'adam':
    tx = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  elif name == 'sgd':
    tx = optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov)
  elif name == 'muon':
    ratio = (opt_cfg.adam_lr or opt_cfg.lr) / opt_cfg.lr
    tx = muon(schedule, lambda count: ratio * schedule(count), beta=opt_cfg.muon_beta,
              b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  elif name == 'rmsprop':
    tx = optax.rmsprop(schedule, eps=opt_cfg.eps, momentum=opt_cfg.momentum or None,
                       nesterov=opt_cfg.nesterov)
  else:
    raise UserError(f'unknown optimizer.name {name!r}; known: {", ".join(OPTIMIZERS)}')
  if name != 'adamw' and opt_cfg.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), tx)
  if clip and opt_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), tx)
  return tx, schedule
