"""Does a trained Transformer-XL use its memory? Validation bpc with and without it.

Restores the last checkpoint of a Transformer-XL workdir and scores the run's validation
batches twice: as the task evaluates them (rows are consecutive segments, memory carried
from row to row, zeros before row 0) and with zero memory for every row. The gap is what
the memory is worth to that model. Single process.

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
from accel.models import transformer_xl


def memory_gap(workdir: str) -> dict:
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  data = input_pipeline.build(config)
  task, trainer = train.build(config, data.info)
  state = trainer.init(jax.random.key(0), jax.tree.map(jnp.asarray, data.train(0)))
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state = checkpoints.restore(state)
  checkpoints.close()
  model = task.model

  @jax.jit
  def losses(params, batch):
    carried = task.evaluate(params, {}, batch)['loss']
    zeros = transformer_xl.zero_memory(model.cfg, batch['inputs'].shape[0])
    logits, _ = model.apply({'params': params}, batch['inputs'], zeros, method='segment')
    return carried, task.objective(logits, batch)[0]
  carried, zero = np.mean([losses(state.params, b) for b in data.eval_batches()], axis=0)
  return {'step': int(state.step), 'bpc_memory_carried': float(carried / np.log(2)),
          'bpc_zero_memory': float(zero / np.log(2))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  print(json.dumps(memory_gap(p.parse_args(argv).workdir)))


if __name__ == '__main__':
  main()
