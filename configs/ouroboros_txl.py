r"""Ouroboros stale-gradient pipeline (accel/pipeline) on Transformer-XL (byte level).

Command (each preset):
  python -m experiments.train --config configs/ouroboros_txl.py:smoke --workdir runs/ouro_txl_smoke
  JAX_NUM_CPU_DEVICES=2 python -m experiments.train --config configs/ouroboros_txl.py:cpu \
      --workdir runs/ouro_txl_cpu
  python -m experiments.train --config configs/ouroboros_txl.py:gpu   --workdir runs/ouro_txl_gpu
  python -m experiments.train --config configs/ouroboros_txl.py:paper --workdir runs/ouro_txl_paper
Synchronous comparison: the same command with --config.pipeline.enabled=False (the spine's
data-parallel segment training, accel/tasks/segment_lm.py).
Switches: --config.pipeline.num_modules=4 --config.pipeline.tied_ring=False
          --config.pipeline.backward_weights=stored
The pipeline uses num_modules-1 stages (tied ring) or num_modules (untied); the remaining
factor of the device count becomes the data-parallel axis.

Model (accel/models/transformer_xl.py): relative positions, segment recurrence with memory
model.mem_len, PostLN (the original), tied embedding with output bias, cut into K modules
(accel/pipeline/layout.py, pieces_xl.py). Each module keeps the memory of its own layers
and advances it batch by batch as it forwards them (data.order='contiguous': row b of step
t+1 continues row b of step t), exactly as synchronous segment training does; only the
weights it runs with are stale. Optimizer: Ouroboros+Adam, papers.md section 1: Adam (0.9,
0.999, 1e-8), lr 2.5e-4 with cosine decay (to 0.004 lr as the Transformer-XL code), one
Adam per module; gradient clip 0.25 on the global norm of every module's gradient of the
iteration (accel/pipeline/clipping.py); dropout 0.1 in gpu and paper, with each module's
forward of a batch and its delayed backward using the same masks.

Each preset is configs/txl_enwik8.py's (model, data, optimizer, steps) with the pipeline on:
smoke: K=2 tied ring = 1 stage, so it runs on one device; seconds.
cpu:   K=3 tied ring on 2 (simulated) devices: stage 0 holds modules 0 and 2 (one layer
  each) and the tied table, stage 1 module 1 (two layers); PreLN (PostLN does not learn
  past the unigram with stale gradients here, see Measured).
gpu:   K=3 tied ring on 2 GPUs, the 12-layer enwik8 model for 20k steps (a check, not a result).
paper: the Transformer-XL base enwik8 recipe of papers.md (12 layers, d_model 512, 8 heads,
  d_inner 2048, segment = memory = 512, batch 22, 400k steps, Adam lr 2.5e-4 cosine,
  dropout 0.1, clip 0.25), K=4 tied ring on 3 stages (modules of 2, 4, 4, 2 layers).

Measured 2026-11-28 on the shared 2-core CPU machine (JAX_NUM_CPU_DEVICES=2), validation
bits per byte after 300 steps (at steps 100 / 200 / 300):
  cpu                                  4.475 / 4.454 / 4.343
  cpu, --config.pipeline.enabled=False 3.274 / 2.986 / 2.897   (2-way data parallel)
  cpu, --config.model.pre_ln=False     4.752 / 4.736 / 4.729   (PostLN: stays at the unigram)
  the same, pipeline.enabled=False     3.723 / 3.114 / 2.990
  smoke (20 steps, one device)         7.554 after 20 steps (train loss 5.25 nats)
The pipeline trails synchronous training by 1.45 bits per byte (+50%) here, at lr 2e-3
with delays of up to 2(K-1) = 4 iterations. The tests pin the pipeline to its reference
and the reference at zero delay to segment training, so we read the gap as staleness:
plain segment training that applies each gradient one step late (all parameters, same
lr, 80 steps) also stays at the unigram for PostLN (train loss 3.29 nats vs 2.64 on time)
and learns more slowly for PreLN (2.85 vs 2.48). gpu, paper: not run.
"""
from configs import txl_enwik8

_MODULES = {'smoke': 2, 'cpu': 3, 'gpu': 3, 'paper': 4}    # K, each on a tied ring


def get_config(arg: str = 'cpu'):
  """configs/txl_enwik8.py's preset `arg`, trained by the Ouroboros pipeline."""
  c = txl_enwik8.get_config(arg)
  c.pipeline.enabled = True
  c.pipeline.num_modules = _MODULES[arg]
  c.pipeline.tied_ring = True
  c.pipeline.backward_weights = 'recompute'
  if arg == 'cpu':
    c.model.pre_ln = True
  return c
