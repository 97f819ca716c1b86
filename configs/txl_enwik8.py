r"""Transformer-XL character/byte LM: enwik8 (gpu, paper) or the offline Shakespeare corpus.

Command (each preset):
  python -m experiments.train --config configs/txl_enwik8.py:smoke --workdir runs/txl_smoke
  python -m experiments.train --config configs/txl_enwik8.py:cpu   --workdir runs/txl_cpu
  python -m experiments.train --config configs/txl_enwik8.py:gpu   --workdir runs/txl_gpu
  python -m experiments.train --config configs/txl_enwik8.py:paper --workdir runs/txl_paper
enwik8 downloads from mattmahoney.net on first use, or put enwik8.zip into
$ACCEL_DATA_DIR/downloads/manual/ (see accel/data/corpora.py). text8: --config.data.name=text8.

Model (accel/models/transformer_xl.py): relative positions, segment recurrence with memory
model.mem_len, PostLN (model.pre_ln=False, the original), tied embedding with output bias.
Training (accel/tasks/segment_lm.py): contiguous streams (data.order='contiguous'), the memory
carried across steps in the train state; evaluation carries the memory across the rows of
each validation batch (consecutive segments).

paper: the Transformer-XL base enwik8 settings of papers.md section 1 and the public code
(tf/scripts/enwik8_base_gpu.sh, tf/train_gpu.py defaults): 12 layers, d_model 512, 8 heads,
d_inner 2048, segment = memory = 512, batch 22 (the PyTorch script; the TF one uses 24),
400k steps, dropout 0.1, Adam (0.9, 0.999, 1e-8) lr 2.5e-4, no warm-up, cosine decay to
0.004 lr (min_lr_ratio), gradient clip 0.25. Not modelled: the public evaluation with a
longer memory (2100), clamp_len and same_length. Reference: 1.06 bpc test for the 12-layer
model (paper Table 2); papers.md's 0.99 is the 24-layer model.
gpu: the same model for 20k steps (a one-GPU check of the recipe, not a result).

Expected (cpu preset, measured 2026-11-28 on 2 shared CPU cores, a few minutes): validation
2.956 bits per byte after 300 steps (2.849 with model.mem_len=0); details and 1000-step runs
in results/txl_cpu.md.
"""
from accel import config_lib


def get_config(arg: str = 'cpu'):
  c = config_lib.base_config()
  c.data.name = 'shakespeare'
  c.data.order = 'contiguous'
  c.model.name = 'transformer_xl'
  c.model.pre_ln = False
  c.model.mem_len = 0
  c.optimizer.name = 'adam'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = 'cosine'
  c.optimizer.end_lr_fraction = 0.004
  c.optimizer.clip_norm = 0.25
  if arg == 'smoke':
    c.total_steps = 20
    c.batch_size = 4
    c.data.seq_len = 16
    c.model.mem_len = 16
    c.model.num_layers = 2
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 0
    c.eval_every = 10
    c.eval_steps = 2
    c.log_every = 5
    c.checkpoint_every = 10
  elif arg == 'cpu':
    c.total_steps = 300
    c.batch_size = 16
    c.data.seq_len = 64
    c.model.mem_len = 64
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
    c.data.name = 'enwik8'
    c.total_steps = 20_000 if arg == 'gpu' else 400_000
    c.batch_size = 22
    c.data.seq_len = 512
    c.model.mem_len = 512
    c.model.num_layers = 12
    c.model.d_model = 512
    c.model.num_heads = 8
    c.model.d_ff = 2048
    c.model.dropout_rate = 0.1
    c.optimizer.lr = 2.5e-4
    c.optimizer.warmup_steps = 0
    c.eval_every = 4000
    c.eval_steps = 20
    c.log_every = 200
    c.checkpoint_every = 4000
  else:
    raise ValueError(f'unknown preset {arg!r}; known: smoke, cpu, gpu, paper')
  return c
