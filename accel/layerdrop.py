"""Progressive Layer Dropping (Zhang & He, NeurIPS 2020; papers.md section 2).

Schedule over the training step t (section 2 of papers.md):

  theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar          (theta(0) = 1)
  p_l(t)   = 1 - (l / L) * (1 - theta(t)),  l = 1..L                (lower layers kept more)

Each training step draws one gate G_l ~ Bernoulli(p_l(t)) per layer, shared by the whole
batch, from a key derived only from (seed, step): drawn on the host (jax on the CPU
backend), before the step is dispatched, the same bits on every host and replica with no
communication. The step gets the kept layers as data, `layer_ids_N` (int32 [N], sorted)
and `keep_probs_N` (their p_l), and `accel.models.transformer.BlockStack` runs exactly those
N blocks, unrolled, with their parameters gathered from the stacked layer parameters by
index and both sublayers scaled by 1/p_l: h = x + Attn(LN1(x)) / p_l, out = h +
FFN(LN2(h)) / p_l. A step's program depends only on N, so a run has at most L + 1 of them
(`accel.programs`), and none holds a cond, switch, scan or while (on XLA:GPU each of those
waits for the host). Evaluation passes no plan: every layer runs, unscaled. theta_bar = 1
never drops a layer and plans nothing: the baseline's program, bitwise.

FLOPs: the loop reports the cost analysis of the program that ran (program N).

A dropped block's parameters get a zero gradient this step, and the optimizer still steps
them. AdamW (optax.adamw) then decays their moments, m <- b1 m and v <- b2 v, and applies
-lr_t (m_hat / (sqrt(v_hat) + eps) + weight_decay * w): a dropped block keeps moving along
its momentum (shrinking by about b1 / sqrt(b2) per dropped step) and is weight-decayed as
usual; its zeros add nothing to the global gradient norm that clipping uses. DeepSpeed's
implementation did the same: its BERT (DeepSpeedExamples bing_bert/nvidia/
modelingpreln_layerdrop.py, BertLayer.forward) skips a dropped layer in Python, so the
layer's parameters have no gradient, and DeepSpeed's FP16_Optimizer
(deepspeed/runtime/fp16/fused_optimizer.py, used by the fp16 PLD recipe whose config has
Adam with weight_decay 0.01) puts zeros in place of every missing gradient before its flat
Adam step: there too the moments decay and the weight decay applies. Its gates came from
numpy's RNG on each rank (np.random.choice per layer, in BertEncoder.forward), and it lowered
p before calling the layer: its layer l was kept with probability p_(l-1) (p_0 = 1) and
scaled by 1/p_l (papers.md: use the formula, as here).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from accel.errors import UserError
from accel.method import Method, StepPlan

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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def step_gates(num_layers: int, theta_bar: float, gamma: float, seed: int, step):
  """(gates_L, keep_probs_L, theta) of train step `step`.

  Pure: the same bits for the same (seed, step) wherever it runs (jax.random is backend
  independent); `LayerDrop.plan` runs it on the host's CPU.
  """
  keep_probs_L = keep_probs(step, num_layers, theta_bar, gamma)
  return (sample_gates(gate_key(seed, step), keep_probs_L), keep_probs_L,
          theta(step, theta_bar, gamma))


def expected_layers(num_layers: int, theta_value) -> jax.Array:
  """E[layers run] = sum_l p_l = L - (1 - theta) (L + 1) / 2 (8.75 for L=12, theta=0.5)."""
  return num_layers - (1.0 - theta_value) * (num_layers + 1) / 2.0


def plan_arrays(gates_L, keep_probs_L) -> dict[str, np.ndarray]:
  """The model inputs of one step: layer_ids_N (int32, the kept layers in order) and
  keep_probs_N (float32, their p_l)."""
  layer_ids_N = np.flatnonzero(np.asarray(gates_L)).astype(np.int32)
  return {'layer_ids_N': layer_ids_N,
          'keep_probs_N': np.asarray(keep_probs_L, np.float32)[layer_ids_N]}


class LayerDrop(Method):
  """The method: the kept layers of each train step decided on the host (`plan`).

  plan(step): the gates of `step_gates`, evaluated on the host's CPU, as the model inputs
  of `plan_arrays`, and the metrics `layerdrop/theta` and `layerdrop/layers_run` (blocks
  executed this step). With theta_bar = 1 the plan is empty: the baseline's program.
  """
  block = 'layerdrop'
  models = ('transformer_lm', 'bert')

  def check(self, config) -> None:
    ld = config.layerdrop
    if config.model.scan_layers:
      raise UserError('layerdrop.enabled runs the kept blocks unrolled (a scan waits for '
                      'the host on GPU); set model.scan_layers=False')
    if not 0.0 < ld.theta_bar <= 1.0 or ld.gamma < 0.0:
      raise UserError(f'layerdrop needs 0 < theta_bar <= 1 and gamma >= 0, got theta_bar '
                      f'{ld.theta_bar}, gamma {ld.gamma}')

  def plan(self, config, step: int) -> StepPlan:
    ld, num_layers = config.layerdrop, config.model.num_layers
    if ld.theta_bar >= 1.0:
      return StepPlan({}, {'layerdrop/theta': 1.0, 'layerdrop/layers_run': float(num_layers)})
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
      gates_L, keep_probs_L, theta_t = jax.device_get(step_gates(
          num_layers, float(ld.theta_bar), float(ld.gamma), int(config.seed), step))
    kwargs = plan_arrays(gates_L, keep_probs_L)
    return StepPlan(kwargs, {'layerdrop/theta': float(theta_t),
                             'layerdrop/layers_run': float(len(kwargs['layer_ids_N']))})


METHOD = LayerDrop()
