"""`train_and_evaluate(config, workdir)`: the one training loop of accel.

config -> data + task (model + method hooks) -> one jitted, pure train step over a ('data',)
mesh -> metrics.jsonl / TensorBoard / orbax checkpoints. Running again in the same workdir
resumes from its last checkpoint, bitwise: batches are a function of the step, dropout and
method randomness of fold_in(seed, step).

The step's metrics are fetched after the next step is dispatched (the device never waits for
the host); a non-finite loss stops the run before any later state is checkpointed.
Faults follow accel.faults: the config is validated and the workdir claimed
(accel.workdir) before anything is prepared or compiled; SIGINT / SIGTERM stop the run
after its current step with a checkpoint of it (accel.interrupts); environment errors end
it with one line naming the checkpoint that is intact.
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

from accel import config_lib, faults, interrupts, methods, tasks
from accel import workdir as workdir_lib
from accel.checkpoint import Checkpoints
from accel.data import input_pipeline
from accel.errors import UserError
from accel.metrics import MetricWriter, read_jsonl
from accel.programs import Lookahead, Programs, cache_dir, signature, use_compilation_cache
from accel.trainer import Trainer, build_trainer


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


def _claim(workdir: str) -> workdir_lib.Lock | None:
  """Process 0 takes the workdir's lock; every process learns whether it did."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = workdir_lib.claim(workdir)
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    claimed = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not claimed and error is None:
      error = UserError(f'process 0 could not claim workdir {workdir}; see its error line')
  if error is not None:
    raise error
  return lock


def _already_done(workdir: str, step: int) -> dict:
  """The summary of a workdir whose run already reached `total_steps`."""
  if jax.process_index() == 0:
    print(f'already at step {step} in {os.path.abspath(workdir)}; nothing to train (raise '
          'total_steps to extend the run)', flush=True)
  summary: dict = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  for line in read_jsonl(path) if os.path.exists(path) else []:
    summary.update(line)
  summary.update(step=step, workdir=os.path.abspath(workdir))
  return summary


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
  config_lib.validate(config)
  methods.Enabled(config)          # the methods' checks, before any data is prepared
  use_compilation_cache(cache_dir(config))
  with interrupts.StopSignals(before_loop='before the first step') as stop:
    lock = _claim(workdir)
    if lock is not None:
      stop.cleanup = lock.release
    try:
      return _train(config, workdir, stop)
    finally:
      if lock is not None:
        lock.release()


def _train(config, workdir: str, stop: interrupts.StopSignals) -> dict:
  is_main = jax.process_index() == 0
  problem = workdir_lib.checkpoint_folder_problem(workdir)
  if problem:
    raise UserError(f'{problem}; the workdir was left as it is — use a new --workdir')
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  try:
    with faults.environment_errors(
        lambda: f'stopped at step {stop.step or 0}; {checkpoints.intact()}'):
      summary = _train_with(config, workdir, stop, checkpoints, is_main)
      checkpoints.wait()
      checkpoints.close()
      return summary
  except BaseException as e:
    if not (isinstance(e, interrupts.Interrupted) and e.exit_now):
      _close_after_failure(checkpoints)
    raise


def _close_after_failure(checkpoints: Checkpoints) -> None:
  """Lets a save in flight finish (bounded), then closes without raising again: the
  failure being reported is the one that matters."""
  try:
    checkpoints.wait(interrupts.CHECKPOINT_WAIT_S)
  except Exception:  # the save failed too (the same full disk): its tmp folder is ignored
    pass
  try:
    checkpoints.close()
  except Exception:
    pass


def _train_with(config, workdir: str, stop: interrupts.StopSignals, checkpoints: Checkpoints,
                is_main: bool) -> dict:
  latest = checkpoints.latest_step()
  workdir_lib.check_resumable(config, workdir, latest)
  if latest is not None and latest == config.total_steps:
    return _already_done(workdir, latest)
  start = latest or 0
  stop.step = latest
  writer = MetricWriter(workdir, start, enabled=is_main)
  saved_config = workdir_lib.read_saved_config(workdir)
  config_current = saved_config == json.loads(config_lib.to_json(config))
  data = input_pipeline.build(config)
  task, trainer = build(config, data.info)
  enabled = task.methods

  first_batch = _device_batch(trainer, data.train(0))
  state = trainer.init(jax.random.fold_in(jax.random.key(config.seed), 0), first_batch)
  if latest is not None:
    state = checkpoints.restore(state)
    if is_main:
      print(f'resumed from step {start} ({os.path.join(checkpoints.directory, str(start))})',
            flush=True)
  programs = Programs(trainer.train_step, state, first_batch)
  plans = Lookahead(enabled.plan, programs, start, config.total_steps)
  programs.get(plans.peek().model_kwargs)
  tokens_per_example = task.tokens_per_example()

  prefetch = concurrent.futures.ThreadPoolExecutor(1)
  next_batch = prefetch.submit(data.train, start)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, unit='step', dynamic_ncols=True,
                  disable=not (is_main and config.progress_bar), desc=os.path.basename(workdir))
  summary: dict[str, float] = {}
  pending = None                     # (step, device metrics) not yet fetched
  timer = (time.perf_counter(), start)
  saved_step = latest

  def fetch(step, device_metrics, plan):
    metrics = {f'train/{k}': float(v) for k, v in jax.device_get(device_metrics).items()}
    metrics.update({f'train/{k}': v for k, v in plan.metrics.items()})
    if not np.isfinite(metrics['train/loss']):
      checkpoints.wait(interrupts.CHECKPOINT_WAIT_S)
      steps = checkpoints.steps_on_disk()
      where = (f'the last good checkpoint, step {steps[-1]} in {checkpoints.directory}, is '
               'intact' if steps else 'no checkpoint had been written')
      raise TrainingDiverged(f'train/loss is {metrics["train/loss"]} at step {step}; '
                             f'stopped ({where})')
    summary.update(metrics)
    return metrics

  def save(step):
    """A checkpoint of `step`; the run's first also writes config.json once it is complete
    (so a run that fails before it leaves nothing that blocks the corrected rerun)."""
    nonlocal config_current, saved_step
    checkpoints.save(step, state)
    saved_step = step
    if not config_current:
      checkpoints.wait()
      if is_main:
        workdir_lib.write_config(config, workdir)
      config_current = True

  done = start
  stop.defer()                       # from here a signal stops the run after its step
  try:
    for step in range(start, config.total_steps):
      if stop.requested:
        break
      batch = _device_batch(trainer, next_batch.result())
      plan = plans.pop()
      if step + 1 < config.total_steps:
        next_batch = prefetch.submit(data.train, step + 1)
      state, device_metrics = programs.get(plan.model_kwargs)(
          state, batch, jax.device_put(plan.model_kwargs, trainer.replicated))
      plans.advance()
      if pending is not None:
        fetch(*pending)
      pending = (step, device_metrics, plan)
      done = stop.step = step + 1
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
                'perf/flops_per_step': programs.flops[signature(plan.model_kwargs)],
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
        save(done)
      timer = (time.perf_counter(), done)
    if pending is not None:
      fetch(*pending)
    if stop.requested and done < config.total_steps:
      if saved_step != done:
        save(done)
      written = checkpoints.wait(interrupts.CHECKPOINT_WAIT_S)
      raise interrupts.Interrupted(
          stop.requested, done, exit_now=not written,
          note='' if written else f'its checkpoint was still being written after '
          f'{interrupts.CHECKPOINT_WAIT_S:.0f} s, so the rerun starts from the last complete one')
  finally:
    bar.close()
    prefetch.shutdown(wait=False, cancel_futures=True)
    programs.close()
    writer.close()
  summary['step'] = config.total_steps
  summary['workdir'] = os.path.abspath(workdir)
  return summary
