r"""Standardization loss vs normalization baselines on a CIFAR-style ResNet.

Collins, Ballé, Shlens 2019 (papers.md section 4) apply the loss to every pre-activation
of ResNet-50 on ImageNet with lambda = 1e-6; this is the CIFAR ResNet (He et al. 2016,
depth 6n+2, accel/models/cnn.py) with the same switch. Offline stand-in data: scikit-learn's
8x8 digits (data.name=digits); CIFAR-10 is --config.data.name=cifar10 (accel/data/images.py;
evaluated on its test split; pixels / 255, no augmentation). There is no gpu/paper preset.

The config argument is 'PRESET[,VARIANT]':
  PRESET  smoke (ResNet-8, seconds) | cpu (ResNet-20, 1500 steps)
  VARIANT none (default) | batch | group | layer (model.norm) | stdloss (no norm +
          stdloss.enabled)
lambda (stdloss.weight) = 1e-3 here: not a paper value (the paper has none for CIFAR);
the loss sums over all 1 + 18 + 2 convs' channels, so its scale grows with the network.

Commands:
  python -m experiments.train --config configs/stdloss_resnet.py:cpu,stdloss
  python -m experiments.train --config configs/stdloss_resnet.py:cpu,batch \
      --config.model.depth=32 --config.stdloss.weight=1e-4
  python -m experiments.train --config configs/stdloss_resnet.py:cpu,stdloss \
      --config.data.name=cifar10 --workdir runs/stdloss_resnet_cifar10
Measured (cpu, seed 0, 2026-11-28, results/stdloss_resnet_cpu.md): validation accuracy
after 1500 steps none 98.3 %, batch 98.1 %, stdloss 99.7 %; all three saturate within 200
steps, so this stand-in shows the plumbing, not a speedup.
"""
from accel import config_lib
from configs import stdloss_mnist

PRESETS = ('smoke', 'cpu')


def get_config(arg: str = 'cpu'):
  preset, *rest = arg.split(',')
  variant = rest[0] if rest else 'none'
  if preset not in PRESETS or len(rest) > 1 or variant not in stdloss_mnist.VARIANTS:
    raise ValueError(f'bad config argument {arg!r}; expected PRESET[,VARIANT] with PRESET in '
                     f'{PRESETS}, VARIANT in {stdloss_mnist.VARIANTS}')
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.model.name = 'resnet'
  stdloss_mnist.set_variant(c, variant)
  c.stdloss.weight = 1e-3
  c.optimizer.name = 'sgd'
  c.optimizer.lr = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = 'cosine'
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.clip_norm = 0.0
  c.eval_batch_size = 120        # 3 batches = the whole validation split
  c.eval_steps = -1
  c.keep_checkpoints = 1
  if preset == 'smoke':
    c.model.depth = 8
    c.total_steps = 20
    c.batch_size = 16
    c.optimizer.warmup_steps = 2
    c.eval_every = 10
    c.log_every = 5
    c.checkpoint_every = 20
  else:
    c.model.depth = 20
    c.total_steps = 1500
    c.batch_size = 128
    c.optimizer.warmup_steps = 75
    c.eval_every = 100
    c.log_every = 50
    c.checkpoint_every = 500
  return c
