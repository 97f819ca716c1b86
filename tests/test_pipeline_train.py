"""The pipeline inside the spine's loop (pipeline.enabled): learns, resumes exactly.

configs/ouroboros_lm.py:smoke is K=2 on a tied ring, i.e. 1 stage, so it runs in this
process on one device; the history buffers (inboxes, activation ring, token ring) are part
of the checkpoint, so stopping at step 10 and resuming must repeat the uninterrupted run
bitwise. With dropout and the global-norm clip on (the paper preset's 0.1 and 0.25): the
masks are a function of the seed and the step, so the resumed run draws the same ones.
configs/ouroboros_txl.py:smoke (Transformer-XL, K=2 tied ring, 'recompute', here with the
same dropout and clip) adds the recurrence memory and the memory each delayed batch read
to that state: a resumed run that lost them would attend to zeros and differ. The 'stored'
run uses weight prediction (pipeline.weight_prediction = 1), whose w^{t-1} is state too,
and every remedy (accel/pipeline/remedies.py): a synchronous warm-up of 3 steps (its own
program, chosen by the step's plan), DC-ASGD (the forward weights beside the history),
error feedback (each layer's last gradient), PipeMare's lr factor and the Nesterov momentum
(with weight prediction's w^{t-1}).
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from accel import train
from accel.checkpoint import Checkpoints
from accel.metrics import read_jsonl
from configs import ouroboros_lm, ouroboros_txl


REMEDIES = dict(sync_warmup_steps=3, delay_compensation=50.0, pipemare_steps=8,
                error_feedback=0.5, nesterov_momentum=0.5)


def smoke(total_steps, backward_weights='recompute', config_module=ouroboros_lm,
          weight_prediction=0.0, **remedies):
  config = config_module.get_config('smoke')
  config.pipeline.weight_prediction = weight_prediction
  for key, value in remedies.items():
    config.pipeline[key] = value
  config.progress_bar = False
  config.total_steps = total_steps
  config.optimizer.schedule = 'constant'   # independent of total_steps: resumable
  config.pipeline.backward_weights = backward_weights
  config.model.dropout_rate = 0.1
  config.optimizer.clip_norm = 0.25
  return config


def _logged(workdir):
  return read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _checkpoint(workdir):
  manager = Checkpoints(workdir, 3)
  restored = manager._manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return restored


def test_pipeline_trains_and_resumes_exactly(tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  config = lambda steps: smoke(steps, 'stored', weight_prediction=1.0, **REMEDIES)
  summary = train.train_and_evaluate(config(20), a)
  train.train_and_evaluate(config(10), b)
  train.train_and_evaluate(config(20), b)
  la, lb = _logged(a), _logged(b)
  assert [(m['step'], m['train/loss']) for m in la] == [(m['step'], m['train/loss']) for m in lb]
  # K=2: the loss module sees its first batch at iteration 1, so every logged step is filled.
  assert all(m['train/pipeline_filled'] == 1.0 for m in la)
  assert la[-1]['train/loss'] < la[0]['train/loss'] - 0.3
  assert all(m['train/grad_norm'] > 0.25 for m in la)   # the clip scaled every logged step
  assert 'eval/bits_per_byte' in la[-1] and summary['eval/loss'] == la[-1]['eval/loss']
  ca, cb = _checkpoint(a), _checkpoint(b)
  # weight prediction's w^{t-1}, DC-ASGD's forward weights and error feedback's gradients
  # are part of the state (lost, the resumed run would differ)
  assert set(ca['mutable']) == {'act_in', 'grad_in', 'hist', 'tokens', 'prev_params', 'hist_w',
                                'prev_grad', 'has_prev'}
  jax.tree.map(np.testing.assert_array_equal, ca, cb)


def test_txl_pipeline_resumes_with_its_memory(tmp_path):
  """Resumes a copy of the run from its step-3 checkpoint: the same steps 4-6, bitwise."""
  config = smoke(6, 'recompute', ouroboros_txl)
  config.checkpoint_every = config.log_every = 3
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  train.train_and_evaluate(config, a)
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, 'checkpoints', '6'))
  train.train_and_evaluate(config, b)
  losses = lambda log: [(m['step'], m['train/loss'], m.get('eval/loss')) for m in log]
  assert losses(_logged(b)) == losses(_logged(a)) and len(_logged(a)) == 2
  ca, cb = _checkpoint(a), _checkpoint(b)
  assert {'mem', 'hist_mem'} <= set(ca['mutable'])
  assert np.abs(ca['mutable']['mem']).max() > 0
  jax.tree.map(np.testing.assert_array_equal, ca, cb)
