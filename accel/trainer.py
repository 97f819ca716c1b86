"""How training is laid out on devices: TrainState, Trainer and the data-parallel trainer.

A `Trainer` is what the loop (`accel.train`) needs from a parallel layout: how to
initialise the state and take one step. `build_trainer` picks it by the layout name the
enabled methods give (`accel.methods.Enabled.layout`): 'data_parallel' (here) unless a
method supplies its own (the Ouroboros pipeline, `accel.pipeline.trainer`).

The train step is `train_step(state, batch, plan_kwargs) -> (state, metrics)`:
plan_kwargs are the arrays the methods decided on the host for this step
(`accel.method.StepPlan`), passed to the model's training apply; each distinct shape of
them is its own compiled program (`accel.programs`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from accel import optim
from accel.method import DATA_PARALLEL


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  mutable: Any          # non-parameter collections, e.g. batch_stats


@dataclasses.dataclass
class Trainer:
  """How one parallel layout initialises its state and takes one step."""
  init: Callable[..., Any]           # (rng, batch, params=None) -> state; params: the
                                     # model's to start from (None: initialised from rng)
  train_step: Callable[[Any, dict, dict], tuple[Any, dict]]    # jitted (state, batch, plan)
  eval_step: Callable[[Any, dict], dict]                       # (state, batch) -> metrics
  batch_sharding: NamedSharding
  # state -> the model's params (the pipeline reassembles them from its stages)
  model_params: Callable[[Any], Any] = lambda state: state.params

  @property
  def replicated(self) -> NamedSharding:
    """Where host-decided step inputs (the plan) go: every device of the layout's mesh."""
    return NamedSharding(self.batch_sharding.mesh, P())


def train_rng(config) -> jax.Array:
  """The rng of training randomness; step t's is fold_in(train_rng, t)."""
  return jax.random.fold_in(jax.random.key(config.seed), 1)   # 0 is for init


def data_parallel_trainer(config, task, tx: optax.GradientTransformation, schedule,
                          mesh: Mesh) -> Trainer:
  """Params replicated, batch split over the 'data' mesh axis; XLA inserts the all-reduce.
  Mutable collections lie as the task says (`Task.mutable_spec`: Transformer-XL's memory
  with its batch rows, so no device gathers the others' streams)."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  specs = {c: task.mutable_spec(c) for c in task.mutable_collections}
  # One prefix for all where every collection is replicated: a model may lack one of the
  # task's collections (an MLP has no batch_stats), which a dict of shardings would not fit.
  mutable_sharding = (replicated if all(spec == P() for spec in specs.values())
                      else {c: NamedSharding(mesh, spec) for c, spec in specs.items()})
  state_sharding = TrainState(step=replicated, params=replicated, opt_state=replicated,
                              mutable=mutable_sharding)
  base_rng = train_rng(config)

  def init(rng, batch, params=None):
    variables = task.init(rng, batch, params)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), mutable=variables)

  def train_step(state: TrainState, batch, plan_kwargs):
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    (loss, (metrics, mutable)), grads = grad_fn(state.params, state.mutable, batch, rng,
                                                True, plan_kwargs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, 'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, mutable), metrics

  def eval_step(state: TrainState, batch):
    return task.evaluate(state.params, state.mutable, batch)

  return Trainer(
      init=jax.jit(init, out_shardings=state_sharding),
      train_step=jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, replicated),
                         out_shardings=(state_sharding, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding),
                        out_shardings=replicated),
      batch_sharding=batch_sharding)


def build_trainer(config, task, mesh: Mesh) -> Trainer:
  """The trainer of the layout the enabled methods ask for, with their optimizer wrappers.

  A layout of its own (the pipeline) clips the global norm across its stages itself
  (`accel.pipeline.clipping`), so its optimizer is built without the clip.
  """
  methods = task.methods
  tx, schedule = optim.build_optimizer(config.optimizer, config.total_steps,
                                       clip=methods.layout == DATA_PARALLEL)
  tx = methods.wrap_optimizer(tx)
  if methods.layout_method is not None:
    return methods.layout_method.build_trainer(config, task, tx, schedule, mesh)
  return data_parallel_trainer(config, task, tx, schedule, mesh)
