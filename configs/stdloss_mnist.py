r"""Standardization loss vs normalization baselines, the paper's MNIST setup.

Collins, Ballé, Shlens 2019, section 4.1 (papers.md section 4): a CNN of 3 conv layers with
32/16/8 filters, 5x5, stride 2 (or an MLP of 3x100), plain SGD lr 1e-3, batch 128,
1000 steps, weight decay 4e-5, lambda 1.0. Offline the images are scikit-learn's 8x8
digits (data.name=digits: 1437 train / 360 validation), not MNIST's 28x28; the paper's
MNIST is --config.data.name=mnist (accel/data/images.py: 60,000 train, evaluated on the
10,000 test images, 83 full batches of 120 = 9,960 of them; downloaded on first use, or
the four idx .gz files put into $ACCEL_DATA_DIR/downloads/manual/).

The config argument is 'PRESET[,MODEL][,VARIANT]':
  PRESET  smoke (seconds, for tests) | cpu (the paper's hyperparameters on digits)
  MODEL   cnn (default) | mlp
  VARIANT none (default) | batch | group | layer (model.norm) | stdloss (no norm +
          stdloss.enabled, lambda = stdloss.weight)
There is no gpu preset: the paper's model is a few thousand parameters and a 1000-step run
takes under a minute on CPU.

Commands:
  python -m experiments.train --config configs/stdloss_mnist.py:cpu,cnn,stdloss
  python -m experiments.train --config configs/stdloss_mnist.py:cpu,cnn,stdloss \
      --config.data.name=mnist --workdir runs/stdloss_mnist_cnn   # the paper's data
  python -m experiments.train --config configs/stdloss_mnist.py:cpu,mlp,batch
  python -m experiments.reproduce stdloss --scale cpu --out results/tables
      # every study: cnn (5 variants) and mlp (3) x 5 seeds, and the batch-size study
      # (results/stdloss_mnist_cpu_{cnn,mlp}.md, results/stdloss_batch_size.md)
Measured (cpu preset, 5 seeds, 2026-11-28, results/stdloss_mnist_cpu_{cnn,mlp}.md), accuracy
after 1000 steps, mean +- std; paper (MNIST, 1000 steps) in brackets:
  mlp  none 32.5 +- 6.5 [24.6 +- 6.5]  batch 86.7 +- 1.1 [85.6 +- 1.1]
       stdloss 63.5 +- 4.3 [75.2 +- 2.6]; steps to the baseline's best: BN 5.2x, std loss 3.1x
  cnn  none 16.3 +- 9.0  batch 77.1 +- 8.6  group 67.2 +- 11.7  layer 77.3 +- 9.6
       stdloss 16.9 +- 7.2 (no gain here; cause not established - on 8x8 inputs the CNN
       ends in a 1x1x8 map, on MNIST in 4x4x8)
"""
from accel import config_lib

PRESETS = ('smoke', 'cpu')
MODELS = ('cnn', 'mlp')
VARIANTS = ('none', 'batch', 'group', 'layer', 'stdloss')


def parse_arg(arg: str) -> tuple[str, str, str]:
  """'cpu,mlp,stdloss' -> ('cpu', 'mlp', 'stdloss'); model and variant are optional."""
  preset, *rest = arg.split(',')
  model = next((t for t in rest if t in MODELS), 'cnn')
  variant = next((t for t in rest if t in VARIANTS), 'none')
  unknown = [t for t in rest if t not in MODELS + VARIANTS]
  if preset not in PRESETS or unknown or len(rest) > 2:
    raise ValueError(f'bad config argument {arg!r}; expected PRESET[,MODEL][,VARIANT] with '
                     f'PRESET in {PRESETS}, MODEL in {MODELS}, VARIANT in {VARIANTS}')
  return preset, model, variant


def set_variant(c, variant: str) -> None:
  """One of the compared setups: a normalization layer, or none plus the std loss."""
  c.model.norm = 'none' if variant == 'stdloss' else variant
  c.stdloss.enabled = variant == 'stdloss'


def get_config(arg: str = 'cpu'):
  preset, model, variant = parse_arg(arg)
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.model.name = model
  set_variant(c, variant)
  c.model.num_groups = 2         # digits: the CNN's last map is 1x1x8; 8 groups = 1 value each
  c.stdloss.weight = 1.0
  c.optimizer.name = 'sgd'
  c.optimizer.lr = 1e-3
  c.optimizer.momentum = 0.0
  c.optimizer.weight_decay = 4e-5
  c.optimizer.schedule = 'constant'
  c.optimizer.warmup_steps = 0
  c.optimizer.clip_norm = 0.0
  c.eval_batch_size = 120        # 3 batches = the whole validation split
  c.eval_steps = -1
  c.keep_checkpoints = 1
  if preset == 'smoke':
    c.total_steps = 20
    c.batch_size = 16
    c.eval_every = 10
    c.log_every = 5
    c.checkpoint_every = 20
  else:
    c.total_steps = 1000
    c.batch_size = 128
    c.eval_every = 25
    c.log_every = 25
    c.checkpoint_every = 1000
  return c
