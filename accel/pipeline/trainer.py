"""The Ouroboros pipeline as a `accel.trainer.Trainer` (config: pipeline.enabled=True).

The spine's loop stays as it is; this supplies the state init, the train step (one
pipeline iteration, `spmd.Pipeline`) and the eval step (the reassembled model, scored by
its task: `LanguageModelTask` for model.name=transformer_lm, `tasks.SegmentLMTask`
for transformer_xl, whose contiguous batches carry the per-stage memory across steps).
The devices of the loop's mesh are regrouped as ('data', 'stage') with
stage = pipeline.num_modules - 1 (tied ring) or num_modules (untied).

The state is a `TrainState`: params and opt_state stage-stacked, `mutable` the pipeline's
history (inboxes, the ring of inputs or vjp residuals, the token ring) and, for
Transformer-XL, the recurrence memory (and the memory each delayed batch read), with
pipeline.weight_prediction > 0 or pipeline.nesterov_momentum > 0 the params before the last
update, with the remedies (`accel.pipeline.remedies`) their state (DC-ASGD's forward
weights, error feedback's last gradients), so checkpoints hold it and a resumed run
continues the very same iterations.
With pipeline.sync_warmup_steps = N the steps t < N run the synchronous warm-up program
(`spmd.synchronous`), chosen on the host by the step's plan (`method.OuroborosPipeline`).

Metrics: 'loss' is the loss of batch t-(K-1), the batch the loss-side module trained on
at this iteration; during the K-1 warm-up iterations no batch has reached it yet and the
metric reads 0 with 'pipeline_filled' = 0. 'grad_norm' is the global norm of the gradients
applied at this iteration, before clipping (`accel.pipeline.clipping`).

The enabled methods (`task.methods`; those that list the layout 'pipeline') attach here:
their model overrides are in the model config the pieces run, their initial variables
round the params before they are cut into stages, `transform_outputs` and `wrap_blocks`
reach the pieces' head and blocks (`accel.pipeline.hooks`), their optimizer wrapper is in
`tx` (one per layer and owned tensor), and the global-norm clip is taken at
optimizer.clip_norm times their `gradient_scale` (the gradients arrive scaled by the loss
scale, which the wrapped optimizer divides out after the clip).

Dropout keys derive from the same train rng as the data-parallel trainer's
(`accel.trainer.train_rng`): batch b's are fold_in(train_rng, b), folded further with the
module and the data shard (`pieces.dropout_key`), so with a data axis > 1 the masks
depend on the device count.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from accel import tasks
from accel.errors import UserError
from accel.models.transformer import TransformerLM
from accel.models.transformer_xl import TransformerXL
from accel.pipeline import families
from accel.pipeline.hooks import MethodHooks
from accel.pipeline.layout import Layout
from accel.pipeline.spmd import Pipeline, make_mesh
from accel.trainer import Trainer, TrainState, train_rng

_BUFFERS = ('act_in', 'grad_in', 'hist', 'tokens', 'mem', 'hist_mem', 'prev_params', 'hist_w',
            'prev_grad', 'has_prev')
REMEDIES = ('sync_warmup_steps', 'delay_compensation', 'pipemare_steps', 'error_feedback',
            'nesterov_momentum')


def _check(task):
  lm = type(task) is tasks.LanguageModelTask and isinstance(task.model, TransformerLM)
  xl = isinstance(task, tasks.SegmentLMTask) and isinstance(task.model, TransformerXL)
  if not (lm or xl):
    raise UserError('pipeline.enabled needs model.name=transformer_lm or transformer_xl on '
                    'language-model data')


def pipeline_trainer(config, task, tx, schedule, mesh) -> Trainer:
  """tx: the per-module optimizer, without the global-norm clip (`build_trainer`)."""
  _check(task)
  pc, methods = config.pipeline, task.methods
  hooks = MethodHooks(outputs=methods.transform_outputs, wrap_blocks=methods.wrap_blocks)
  model_pieces = families.for_config(task.model.cfg)   # the overrides are in its cfg
  cfg = model_pieces.cfg
  layout = Layout(cfg.num_layers, pc.num_modules, pc.tied_ring)
  devices = mesh.devices.flatten()
  stages = layout.num_stages
  if len(devices) % stages:
    raise UserError(f'{len(devices)} devices cannot hold {stages} pipeline stages')
  data_size = len(devices) // stages
  if config.batch_size % data_size:
    raise UserError(f'batch_size {config.batch_size} not divisible by the data axis '
                    f'{data_size}')
  pmesh = make_mesh(data_size, stages, devices)
  pipe = Pipeline(cfg, layout, tx, pc.backward_weights, pmesh, rng=train_rng(config),
                  clip_norm=config.optimizer.clip_norm * methods.gradient_scale(),
                  weight_prediction=pc.weight_prediction, hooks=hooks,
                  **{name: pc[name] for name in REMEDIES})
  eval_task = dataclasses.replace(task, model=model_pieces.model())
  batch_sharding = NamedSharding(pmesh, P('data'))

  def to_train_state(st):
    return TrainState(step=st['step'], params=st['params'], opt_state=st['opt'],
                      mutable={key: st[key] for key in _BUFFERS if key in st})

  def to_pipeline_state(ts):
    return {'step': ts.step, 'params': ts.params, 'opt': ts.opt_state, **ts.mutable}

  @jax.jit
  def init_params(rng, tokens_1xL, params):
    if params is None:
      params = model_pieces.init_params(rng, tokens_1xL)
    return methods.init_variables({'params': params})['params']

  def init(rng, batch, params=None):
    params = init_params(rng, batch['inputs'][:1], params)
    b, l = batch['inputs'].shape
    return to_train_state(pipe.init(params, b, l))

  def train_step(ts, batch, plan_kwargs):
    # The synchronous warm-up's iterations run their own program (`method.plan`).
    warmup = plan_kwargs.get('pipeline_synchronous')
    step_fn = pipe.sync_step_fn if warmup is not None and warmup.shape[0] else pipe.step_fn
    batch = {'inputs': batch['inputs'], 'targets': batch['targets']}
    st, metrics = step_fn(to_pipeline_state(ts), batch)
    filled = metrics['loss_valid']
    return to_train_state(st), {'loss': jnp.where(filled, metrics['loss'], 0.0),
                                'pipeline_filled': filled.astype(jnp.float32),
                                'grad_norm': metrics['grad_norm'],
                                # the loss-side module's: its count is t-(K-1)
                                'lr': schedule(jnp.maximum(ts.step - (pc.num_modules - 1),
                                                           0))}

  def model_params(ts):
    return pipe.model_params(to_pipeline_state(ts))

  def eval_step(ts, batch):
    return eval_task.evaluate(model_params(ts), {}, batch)

  return Trainer(init=init, train_step=jax.jit(train_step, donate_argnums=0),
                 eval_step=jax.jit(eval_step), batch_sharding=batch_sharding,
                 model_params=jax.jit(model_params))
