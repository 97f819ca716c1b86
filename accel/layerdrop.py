"""Progressive Layer Dropping (Zhang & He, NeurIPS 2020; papers.md section 2).

Schedule over the training step t (section 2 of papers.md):

  theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar          (theta(0) = 1)
  p_l(t)   = 1 - (l / L) * (1 - theta(t)),  l = 1..L                (lower layers kept more)

Each training step draws one gate G_l ~ Bernoulli(p_l(t)) per layer, shared by the whole
batch. The gates come from a key derived only from (seed, step), so every data-parallel
replica and every host draws the same gates without communicating. The gates and p_l go
to `accel.models.transformer.BlockStack`, which runs a block under `nn.cond` only when its
gate is 1 (a dropped block does no compute) and scales a kept block's sublayers by 1/p_l.
Evaluation passes no gates: every layer runs, unscaled.

FLOPs: XLA's cost analysis of a `conditional` counts its costliest branch, so the
compiled cost of a step with switchable blocks is that of the full model. The FLOPs
actually executed are `executed_flops(step_flops, block_flops, L, layers_run)`, with
`block_flops` the cost of one block's forward + backward (`block_train_flops`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from accel.method import Method, StepPlan
from accel.models.transformer import SWITCHABLE_REMAT_POLICY, Block, TransformerConfig

# Separates the gate stream from every other use of `seed` (init, dropout, data).
_GATE_STREAM = 0x5D1D


def theta(step, theta_bar: float, gamma: float) -> jax.Array:
  """theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar, in float32."""
  t = jnp.asarray(step, jnp.float32)
  return (1.0 - theta_bar) * jnp.exp(-gamma * t) + theta_bar


def keep_probs(step, num_layers: int, theta_bar: float, gamma: float) -> jax.Array:
  """p_l(t) = 1 - (l / L) * (1 - theta(t)) for l = 1..L; shape [L]."""
  l_L = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
  return 1.0 - (l_L / num_layers) * (1.0 - theta(step, theta_bar, gamma))


def gate_key(seed: int, step) -> jax.Array:
  """The key of step `step`'s gates: a function of (seed, step) only, never of the device."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _GATE_STREAM), step)


def sample_gates(key: jax.Array, keep_probs_L: jax.Array) -> jax.Array:
  """G_l ~ Bernoulli(p_l), one scalar per layer (bool [L]); p_l = 1 always keeps."""
  return jax.random.bernoulli(key, keep_probs_L)


def step_gates(ld_config: Any, num_layers: int, seed: int, step, train: bool):
  """The train-step hook: (gates_L, keep_probs_L, metrics) for `TransformerLM`.

  ld_config has `enabled`, `theta_bar`, `gamma`. Evaluation (train=False) or disabled
  dropping gives gates None (all layers, unscaled). theta_bar >= 1 can never drop a
  layer, so it too gives gates None: the plain stack, bitwise the baseline (the
  `nn.cond` path with every gate 1 can differ from it in the last bit of a gradient).
  metrics: `layerdrop/theta`, `layerdrop/layers_run` (blocks executed this step).
  """
  if not (train and ld_config.enabled):
    return None, None, {'layerdrop/theta': jnp.float32(1.0),
                        'layerdrop/layers_run': jnp.float32(num_layers)}
  theta_t = theta(step, ld_config.theta_bar, ld_config.gamma)
  if ld_config.theta_bar >= 1.0:
    return None, None, {'layerdrop/theta': theta_t,
                        'layerdrop/layers_run': jnp.float32(num_layers)}
  keep_probs_L = keep_probs(step, num_layers, ld_config.theta_bar, ld_config.gamma)
  gates_L = sample_gates(gate_key(seed, step), keep_probs_L)
  return gates_L, keep_probs_L, {
      'layerdrop/theta': theta_t,
      'layerdrop/layers_run': jnp.sum(gates_L).astype(jnp.float32)}


def expected_layers(num_layers: int, theta_value) -> jax.Array:
  """E[layers run] = sum_l p_l = L - (1 - theta) (L + 1) / 2 (8.75 for L=12, theta=0.5)."""
  return num_layers - (1.0 - theta_value) * (num_layers + 1) / 2.0


def block_train_flops(cfg: TransformerConfig, batch_size: int, seq_len: int) -> float:
  """FLOPs of one switchable block's forward + backward (params and input), per XLA.

  The output is returned with the gradients, as inside a stack where the next block
  reads it (otherwise XLA drops the last projection of the forward as dead code).
  """
  block = Block(cfg)
  x_BxLxD = jax.ShapeDtypeStruct((batch_size, seq_len, cfg.d_model), cfg.dtype)
  params = jax.eval_shape(block.init, jax.random.key(0), x_BxLxD)

  def forward_backward(params, x_BxLxD, scale, cotangent_BxLxD):
    apply = jax.checkpoint(lambda p, x: block.apply(p, x, scale, True),
                           policy=SWITCHABLE_REMAT_POLICY)   # as in the switchable stack
    out_BxLxD, vjp = jax.vjp(apply, params, x_BxLxD)
    return out_BxLxD, vjp(cotangent_BxLxD)

  compiled = jax.jit(forward_backward).lower(
      params, x_BxLxD, jax.ShapeDtypeStruct((), jnp.float32), x_BxLxD).compile()
  return float(compiled.cost_analysis()['flops'])


def executed_flops(step_flops, block_flops, num_layers: int, layers_run):
  """FLOPs a train step executed: the compiled cost (all L blocks) less the dropped ones."""
  return step_flops - (num_layers - layers_run) * block_flops


class LayerDrop(Method):
  """The method: gates drawn on the host for each train step, given to the model's blocks.

  plan(step): `step_gates` evaluated on the host's CPU (the same bits as on any device:
  jax.random is backend independent), as model inputs `gates_L` / `keep_probs_L`, and the
  metrics `layerdrop/theta` and `layerdrop/layers_run` (blocks executed this step).
  With theta_bar >= 1 the plan is empty: the baseline's program.
  """
  block = 'layerdrop'
  models = ('transformer_lm', 'bert')

  def plan(self, config, step: int) -> StepPlan:
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
      gates_L, keep_probs_L, metrics = step_gates(config.layerdrop, config.model.num_layers,
                                                  config.seed, step, train=True)
      kwargs = {} if gates_L is None else {'gates_L': np.asarray(gates_L),
                                           'keep_probs_L': np.asarray(keep_probs_L)}
      return StepPlan(kwargs, {k: float(v) for k, v in metrics.items()})

  def executed_flops(self, config, model, program_flops: float, plan: StepPlan) -> float:
    """The compiled cost (a conditional counts its costliest branch: all L blocks) less one
    block's forward + backward (at the per-device batch) for every block the step dropped."""
    block = _block_train_flops_cached(model.cfg, config.batch_size // jax.device_count(),
                                      config.data.seq_len)
    return executed_flops(program_flops, block, config.model.num_layers,
                          plan.metrics['layerdrop/layers_run'])


_block_train_flops_cached = functools.lru_cache(maxsize=8)(block_train_flops)

METHOD = LayerDrop()
