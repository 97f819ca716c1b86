"""Does a trained Transformer-XL use its memory? Validation bpc with and without it.

Restores the last checkpoint of a Transformer-XL workdir and scores the run's validation
windows twice with the loop's own evaluation (accel.train.evaluate, the trainer's eval
step): as the run evaluates them (batches of eval_batch_size consecutive segments, memory
carried from row to row, zeros before row 0), and in batches of one segment, whose memory
is reset before every segment: the same windows, in the same order, with zero memory. The
gap is what the memory is worth to that model. Single process, first device.

  python -m experiments.txl_memory_eval --workdir runs/txl_cpu
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from accel import train
from accel.checkpoint import Checkpoints
from accel.data import input_pipeline


def _evaluate(config, workdir: str) -> tuple[dict, int, int]:
  """(eval metrics of the workdir's last checkpoint under `config`, its step, the number of
  validation batches)."""
  data = input_pipeline.build(config)
  task, trainer = train.build(config, data.info, jax.devices()[:1])
  state = trainer.init(jax.random.key(0), jax.tree.map(jnp.asarray, data.train(0)))
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state = checkpoints.restore(state)
  checkpoints.close()
  return train.evaluate(trainer, state, data, task), int(state.step), len(data.eval_batches())


def memory_gap(workdir: str) -> dict:
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  carried, step, batches = _evaluate(config, workdir)
  segments = batches * (config.eval_batch_size or config.batch_size)
  config.eval_batch_size, config.eval_steps = 1, segments
  zero, _, _ = _evaluate(config, workdir)
  return {'step': step, 'segments': segments,
          'bpc_memory_carried': float(carried['eval/loss'] / np.log(2)),
          'bpc_zero_memory': float(zero['eval/loss'] / np.log(2))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  print(json.dumps(memory_gap(p.parse_args(argv).workdir)))


if __name__ == '__main__':
  main()
