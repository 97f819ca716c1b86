"""`train_and_evaluate(config, workdir)`: the one training loop of accel.

config -> data + task (model + method hooks) -> one jitted, pure train step over a ('data',)
mesh -> metrics.jsonl / TensorBoard / orbax checkpoints. Running again in the same workdir
resumes from its last checkpoint, bitwise: batches are a function of the step, dropout and
method randomness of fold_in(seed, step).

The step's metrics are fetched after the next step is dispatched (the device never waits for
the host); a non-finite loss stops the run before any later state is checkpointed.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from accel import config_lib, methods, tasks
from accel.checkpoint import Checkpoints
from accel.data import input_pipeline
from accel.errors import UserError
from accel.metrics import MetricWriter
from accel.programs import Programs, signature
from accel.trainer import Trainer, build_trainer


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


def _check_workdir(config, workdir: str) -> None:
  """Refuses a workdir whose config.json holds another experiment (or is unreadable)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path} is unreadable ({e}); the workdir was left as it is') from e
  config_lib.check_same_experiment(saved, config, workdir)


def _write_config(config, workdir: str) -> None:
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config_lib.to_json(config))
    os.replace(tmp, path)


def _device_batch(trainer: Trainer, host_batch: dict) -> dict:
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), host_batch)


def evaluate(trainer: Trainer, state, data, task=None) -> dict:
  """Scalar eval metrics averaged over the batches; where the task's eval step returns
  per-example arrays instead (corpus-level metrics: F1, correlations), they are gathered
  over all batches and reduced by `task.corpus_metrics`."""
  sums: dict[str, float] = {}
  per_example: dict[str, list] = {}
  batches = data.eval_batches()
  for batch in batches:
    for k, v in jax.device_get(trainer.eval_step(state, _device_batch(trainer, batch))).items():
      if np.ndim(v):
        per_example.setdefault(k, []).append(np.asarray(v))
      else:
        sums[k] = sums.get(k, 0.0) + float(v)
  metrics = {k: v / len(batches) for k, v in sums.items()}
  if per_example:
    metrics.update(task.corpus_metrics({k: np.concatenate(v) for k, v in per_example.items()}))
  return {f'eval/{k}': v for k, v in metrics.items()}


def build(config, info, devices=None) -> tuple[tasks.Task, Trainer]:
  """The task and trainer `config` trains with on `devices` (default: all): what the loop
  runs, and what the benchmarks time. info: the dataset's `DatasetInfo`."""
  enabled = methods.Enabled(config)
  task = tasks.build_task(config, info, enabled)
  devices = jax.devices() if devices is None else devices
  if config.batch_size % len(devices):
    raise UserError(f'batch_size {config.batch_size} is not divisible by the '
                    f'{len(devices)} devices of the data mesh')
  return task, build_trainer(config, task, Mesh(np.asarray(devices), ('data',)))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` up to `config.total_steps`; returns the final metrics."""
  is_main = jax.process_index() == 0
  _check_workdir(config, workdir)
  methods.Enabled(config)          # the methods' checks, before any data is prepared
  data = input_pipeline.build(config)
  task, trainer = build(config, data.info)
  enabled = task.methods

  first_batch = _device_batch(trainer, data.train(0))
  state = trainer.init(jax.random.fold_in(jax.random.key(config.seed), 0), first_batch)
  os.makedirs(workdir, exist_ok=True)
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  start = 0
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(state)
    start = int(state.step)
  _write_config(config, workdir)
  writer = MetricWriter(workdir, enabled=is_main)
  writer.truncate_after(start)
  programs = Programs(trainer.train_step, state, first_batch)
  next_plan = enabled.plan(start)
  programs.get(next_plan.model_kwargs)
  tokens_per_example = task.tokens_per_example()

  prefetch = concurrent.futures.ThreadPoolExecutor(1)
  next_batch = prefetch.submit(data.train, start)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, unit='step', dynamic_ncols=True,
                  disable=not (is_main and config.progress_bar), desc=os.path.basename(workdir))
  summary: dict[str, float] = {}
  pending = None                     # (step, device metrics) not yet fetched
  timer = (time.perf_counter(), start)

  def fetch(step, device_metrics, plan):
    metrics = {f'train/{k}': float(v) for k, v in jax.device_get(device_metrics).items()}
    metrics.update({f'train/{k}': v for k, v in plan.metrics.items()})
    if not np.isfinite(metrics['train/loss']):
      last = checkpoints.latest_step()
      where = (f'the last good checkpoint, step {last} in {checkpoints.directory}, is intact'
               if last is not None else 'no checkpoint had been written')
      raise TrainingDiverged(f'train/loss is {metrics["train/loss"]} at step {step}; '
                             f'stopped ({where})')
    summary.update(metrics)
    return metrics

  try:
    for step in range(start, config.total_steps):
      batch = _device_batch(trainer, next_batch.result())
      plan = next_plan
      if step + 1 < config.total_steps:
        next_batch = prefetch.submit(data.train, step + 1)
      state, device_metrics = programs.get(plan.model_kwargs)(
          state, batch, jax.device_put(plan.model_kwargs, trainer.replicated))
      if step + 1 < config.total_steps:
        next_plan = enabled.plan(step + 1)
        programs.prefetch(next_plan.model_kwargs)
      if pending is not None:
        fetch(*pending)
      pending = (step, device_metrics, plan)
      done = step + 1
      bar.update(1)
      log_now = done % config.log_every == 0 or done == config.total_steps
      eval_now = done % config.eval_every == 0 or done == config.total_steps
      ckpt_now = done % config.checkpoint_every == 0 or done == config.total_steps
      if not (log_now or eval_now or ckpt_now):
        continue
      metrics = fetch(*pending)
      pending = None
      if log_now:
        elapsed, steps = time.perf_counter() - timer[0], done - timer[1]
        perf = {'perf/step_time_s': elapsed / steps,
                'perf/examples_per_s': steps * config.batch_size / elapsed,
                'perf/flops_per_step': enabled.executed_flops(
                    task.model, programs.flops[signature(plan.model_kwargs)], plan),
                'perf/programs': len(programs)}
        if tokens_per_example:
          perf['perf/tokens_per_s'] = perf['perf/examples_per_s'] * tokens_per_example
        summary.update(perf)
        metrics.update(perf)
        bar.set_postfix(loss=f'{metrics["train/loss"]:.4f}')
      if eval_now:
        eval_metrics = evaluate(trainer, state, data, task)
        summary.update(eval_metrics)
        metrics.update(eval_metrics)
      writer.write(done, metrics)
      if ckpt_now:
        checkpoints.save(done, state)
      timer = (time.perf_counter(), done)
    if pending is not None:
      fetch(*pending)
  finally:
    bar.close()
    prefetch.shutdown(wait=False, cancel_futures=True)
    programs.close()
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  summary['step'] = config.total_steps
  summary['workdir'] = os.path.abspath(workdir)
  return summary
