r"""FP8 training of a CIFAR-style ResNet (Wang et al. 2018, papers.md section 3).

Every conv (im2col + the three GEMMs) and Dense takes e5m2 operands and accumulates in
e6m9 in chunks; weights, gradients and SGD momentum live in e6m9 with stochastic rounding
in the update; the first conv and the classifier stay float32 (lowprec.exempt_first_last).
Batch norm runs in float32. 'fast' GEMM mode (chunk sums in float32, rounded to e6m9,
added in e6m9; with chunk 1 exactly sequential e6m9 accumulation). Offline data:
scikit-learn's 8x8 digits (data.name=digits); the paper's CIFAR-10 is
--config.data.name=cifar10 (accel/data/images.py: 50,000 train, evaluated on the 10,000
test images; pixels / 255, no augmentation; downloaded on first use, or
cifar-10-python.tar.gz put into $ACCEL_DATA_DIR/downloads/manual/).

The config argument is 'PRESET[,VARIANT]':
  PRESET   smoke (ResNet-8, seconds) | cpu (ResNet-8, batch 32, 600 steps) |
           gpu (ResNet-20, batch 128, 1500 steps)
  VARIANT  fp8 (default: chunk 64) | fp32 | fp8_chunk1 | fp8_nearest  (configs/fp8_lm.py)
`get_sweep(preset)` lists the four variants for experiments.sweep.

Commands:
  python -m experiments.train --config configs/fp8_resnet.py:cpu,fp8 --workdir runs/fp8_resnet
  python -m experiments.train --config configs/fp8_resnet.py:gpu,fp8 \
      --config.data.name=cifar10 --workdir runs/fp8_resnet_cifar10
  python -m experiments.sweep --config configs/fp8_resnet.py:cpu \
      --sweep_dir runs/fp8_resnet_cpu --metrics eval/loss,eval/accuracy
Expected (cpu preset, 2 shared CPU cores, 2026-11-28; results/lowprec_fp8_resnet_cpu.md):
eval accuracy 0.994 for fp32, fp8 and fp8_chunk1, 0.986 for fp8_nearest (one seed each;
digits saturates).
"""
from configs import fp8_lm, stdloss_resnet

PRESETS = ('smoke', 'cpu', 'gpu')


def get_config(arg: str = 'cpu'):
  preset, variant = fp8_lm.parse(arg, PRESETS)
  # The batch-norm ResNet of configs/stdloss_resnet.py (digits, SGD 0.05 momentum 0.9,
  # cosine); gpu = its cpu preset (ResNet-20, batch 128, 1500 steps).
  c = stdloss_resnet.get_config(('smoke' if preset == 'smoke' else 'cpu') + ',batch')
  c.lowprec.loss_scale = 1024.0
  if preset == 'cpu':
    c.model.depth = 8
    c.total_steps = 600
    c.batch_size = 32
    c.optimizer.warmup_steps = 30
    c.eval_every = 200
    c.checkpoint_every = 600
  fp8_lm.set_variant(c, variant)
  return c


def get_sweep(preset: str = 'cpu') -> list[dict]:
  return fp8_lm.get_sweep(preset)
