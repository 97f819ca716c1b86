r"""Byte-level Transformer LM on Shakespeare's plays (the default experiment).

Command (each preset):
  python -m experiments.train                                   # = configs/lm.py:cpu
  python -m experiments.train --config configs/lm.py:smoke      # seconds; used by the tests
  python -m experiments.train --config configs/lm.py:gpu        # GPT-2-small size, one GPU
  python -m experiments.train --config configs/lm.py:paper      # same, 50k steps
Overrides: --config.model.num_layers=8 --config.optimizer.lr=3e-4 --workdir runs/mine
Own text: --config.data.name=text --config.data.path=/path/to/file_or_folder

Model: PreLN decoder, tied embeddings, learned positions, AdamW (0.9, 0.95), wd 0.1, cosine.
Measured 2026-11-28 on the 2-core CPU machine (shared with other jobs, so slower than alone):
  smoke: 20 steps in ~6 s, train loss 5.00, eval loss 5.01 nats.
  cpu:   300 steps in 98 s (~7,800 tokens/s), eval loss 2.25 nats = 3.25 bits per byte
         (from 8.0 bits per byte at initialisation).
  gpu:   the train step of this size runs at 517k tokens/s on one H200, 1.024x the
         PyTorch bar timed beside it (experiments/bench_lm.py, 'candidate' in
         results/bench_lm_gpu.md; 482k with the three options below off); the 5000-step
         run itself was not made.
gpu and paper presets: positions by gather, the GELU recomputed in the backward, no
train-step accuracy (evaluation still reports it): the same values, a faster step.
"""
from accel import config_lib


def get_config(arg: str = 'cpu'):
  c = config_lib.base_config()
  c.data.name = 'shakespeare'
  if arg == 'smoke':
    c.total_steps = 20
    c.batch_size = 8
    c.data.seq_len = 32
    c.model.num_layers = 2
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.optimizer.warmup_steps = 5
    c.eval_every = 10
    c.eval_steps = 2
    c.log_every = 5
    c.checkpoint_every = 10
  elif arg == 'cpu':
    c.total_steps = 300
    c.batch_size = 16
    c.data.seq_len = 128
    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    c.eval_every = 100
    c.eval_steps = 10
    c.log_every = 10
    c.checkpoint_every = 100
  elif arg in ('gpu', 'paper'):
    c.total_steps = 5000 if arg == 'gpu' else 50000
    c.batch_size = 32
    c.data.seq_len = 1024
    c.model.num_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.d_ff = 3072
    c.model.dtype = 'bfloat16'
    c.model.position_lookup = 'gather'
    c.model.gelu_recompute = True
    c.train_accuracy = False
    c.optimizer.lr = 6e-4
    c.optimizer.warmup_steps = 500
    c.eval_every = 1000
    c.eval_steps = 20
    c.log_every = 100
    c.checkpoint_every = 1000
  else:
    raise ValueError(f'unknown preset {arg!r}; known: smoke, cpu, gpu, paper')
  return c
