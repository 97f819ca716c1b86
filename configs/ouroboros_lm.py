r"""Ouroboros stale-gradient pipeline (accel/pipeline) on the byte-level Transformer LM.

Command (each preset):
  python -m experiments.train --config configs/ouroboros_lm.py:smoke --workdir runs/ouro_smoke
  JAX_NUM_CPU_DEVICES=2 python -m experiments.train --config configs/ouroboros_lm.py:cpu \
      --workdir runs/ouro_cpu
  python -m experiments.train --config configs/ouroboros_lm.py:gpu   --workdir runs/ouro_gpu
  python -m experiments.train --config configs/ouroboros_lm.py:paper --workdir runs/ouro_paper
Switches: --config.pipeline.num_modules=4 --config.pipeline.tied_ring=False
          --config.pipeline.backward_weights=stored
          --config.pipeline.weight_prediction=2 (with stored)
Remedies for the stale gradients (accel/pipeline/remedies.py, each 0 = off):
          --config.pipeline.sync_warmup_steps=N --config.pipeline.delay_compensation=L
          (stored) --config.pipeline.pipemare_steps=T --config.pipeline.error_feedback=C
          --config.pipeline.nesterov_momentum=G (stored; G in [0, 1), Ajanthan et al.: 0.99)
          --config.optimizer.name=muon (--config.optimizer.adam_lr for the non-matrices)
The pipeline uses num_modules-1 stages (tied ring) or num_modules (untied); the remaining
factor of the device count becomes the data-parallel axis.

Model: PreLN decoder with tied embeddings (accel/models/transformer.py), cut into K modules
(accel/pipeline/layout.py). Optimizer: Ouroboros+Adam, papers.md section 1: Adam (0.9,
0.999, 1e-8), lr 2.5e-4 with cosine decay, one Adam per module. smoke, cpu, gpu: no
dropout, no gradient clipping. paper: the Transformer-XL base recipe's dropout 0.1 and
gradient clip 0.25; the clip is on the global norm of every module's gradient of the
iteration (accel/pipeline/clipping.py), and each module's forward of a batch and its
delayed backward use the same dropout masks (accel/pipeline/pieces.py).

smoke: K=2 tied ring = 1 stage, so it runs on one device (the delayed-gradient algorithm
  without model parallelism); seconds.
cpu:   K=3 tied ring on 2 (simulated) devices.
gpu:   K=3 tied ring on 2 GPUs, 12 layers d_model 512 on enwik8 (modules of 3, 6, 3 blocks;
  stage 0 holds modules 0 and 2 and the tied table).
paper: the Transformer-XL base enwik8 sizes of papers.md (12 layers, d_model 512, 8 heads,
  d_inner 2048, segment 512, batch 22, 400k steps), here with the plain Transformer and
  K=4 tied ring on 3 stages (the paper's machine had 4 V100s).
Weight prediction (pipeline.weight_prediction = s, default 0.0 = off; 'stored' only): each
delayed module runs its forward with its weights extrapolated s * delay steps along its last
update (SpecTrain, accel/pipeline/prediction.py), which narrows the delayed-gradient gap.
Measured 2026-11-28 on the shared 2-core CPU machine:
  smoke: 20 steps, train loss 5.07, eval loss 5.06 nats (7.29 bits per byte).
  cpu:   300 steps in ~95 s, eval loss 3.09 nats = 4.46 bits per byte; the same config
         with --config.pipeline.enabled=False (synchronous, same optimizer, 2-way data
         parallel): 2.99 nats = 4.31 bits per byte (Ouroboros +3.5%).
  gpu (2026-12-02, one H200): single-GPU part only (results/tables/ouroboros_gpu.md, Shakespeare
         instead of enwik8, 2500 steps, dropout 0.1): K=2 on one device 287k vs
         393k tokens/s synchronous, 3.436 vs 2.161 bits per byte; 28.6 / 39.2 ms per step;
         with the combined remedies 2.198 (results/ouroboros_gpu_combined.md).
  paper: not run. Throughput and loss vs synchronous: experiments/bench_pipeline.py.
"""
from accel import config_lib


def get_config(arg: str = 'cpu'):
  c = config_lib.base_config()
  c.data.name = 'shakespeare'
  c.pipeline.enabled = True
  c.pipeline.tied_ring = True
  c.pipeline.backward_weights = 'recompute'
  c.pipeline.weight_prediction = 0.0
  c.model.dropout_rate = 0.0
  c.optimizer.name = 'adam'
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.lr = 2.5e-4
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 0
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.clip_norm = 0.0
  if arg == 'smoke':
    c.pipeline.num_modules = 2
    c.total_steps = 20
    c.batch_size = 8
    c.data.seq_len = 32
    c.model.num_layers = 2
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.optimizer.lr = 1e-3
    c.eval_every = 10
    c.eval_steps = 2
    c.log_every = 5
    c.checkpoint_every = 10
  elif arg == 'cpu':
    c.pipeline.num_modules = 3
    c.total_steps = 300
    c.batch_size = 16
    c.data.seq_len = 128
    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.optimizer.lr = 2e-3
    c.eval_every = 100
    c.eval_steps = 10
    c.log_every = 10
    c.checkpoint_every = 100
  elif arg in ('gpu', 'paper'):
    c.data.name = 'enwik8'
    c.pipeline.num_modules = 3 if arg == 'gpu' else 4
    c.total_steps = 20_000 if arg == 'gpu' else 400_000
    c.batch_size = 22
    c.data.seq_len = 512
    c.model.num_layers = 12
    c.model.d_model = 512
    c.model.num_heads = 8
    c.model.d_ff = 2048
    c.eval_every = 2000 if arg == 'gpu' else 10_000
    c.eval_steps = 20
    c.log_every = 100
    c.checkpoint_every = 2000 if arg == 'gpu' else 10_000
    if arg == 'paper':   # the Transformer-XL base recipe, as configs/txl_enwik8.py
      c.model.dropout_rate = 0.1
      c.optimizer.clip_norm = 0.25
  else:
    raise ValueError(f'unknown preset {arg!r}; known: smoke, cpu, gpu, paper')
  return c
