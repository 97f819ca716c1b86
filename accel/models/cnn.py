"""Image classifiers, Flax linen: the standardization-loss paper's MNIST CNN and MLP,
and a CIFAR-style ResNet.

Shapes are carried in names: B batch, H/W height/width, C channels, F features,
N classes. Inputs are NHWC float images of any size (8x8x1 digits, 28x28x1 MNIST,
32x32x3 CIFAR-10); outputs are float32 logits_BxN.

Normalization after every hidden Dense/Conv, chosen by `norm` (papers.md section 4
compares them):
  'none'  - nothing (the un-normalized baseline; add `accel.stdloss` to it)
  'batch' - nn.BatchNorm over (B, H, W) per channel; running averages live in the
            'batch_stats' collection and are updated only when `train=True`
  'group' - nn.GroupNorm with gcd(`num_groups`, C) groups over (H, W, C/G)
  'layer' - nn.LayerNorm over all non-batch axes (H, W, C), per-channel scale/bias
Hidden layers carry a bias only with norm='none' (a norm's own bias replaces it).

Hooks the methods attach to, without forking this file:
- `dot_general` / `conv_general_dilated`: every Dense / Conv calls them
  (low-precision GEMMs and convolutions, `accel.lowprec`).
- Every hidden Dense/Conv is a plain `__call__` whose output is the pre-activation,
  so `nn.intercept_methods` sees it (`accel.stdloss`); the classifier is named
  'logits' so it can be told apart.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NORMS = ('none', 'batch', 'group', 'layer')


class _Classifier(nn.Module):
  """Shared fields and layer constructors of the classifiers below."""
  num_classes: int = 10
  norm: str = 'none'
  num_groups: int = 8
  dot_general: Callable[..., jax.Array] = lax.dot_general
  conv_general_dilated: Callable[..., jax.Array] = lax.conv_general_dilated
  # The first conv's and the classifier's own hooks (None: the ones above), so a method
  # can keep them at higher precision (accel.lowprec exempts the first and last layers).
  first_conv_general_dilated: Callable[..., jax.Array] | None = None
  logits_dot_general: Callable[..., jax.Array] | None = None

  def _conv(self, features: int, kernel: int, stride: int, name: str,
            first: bool = False) -> nn.Conv:
    conv = self.first_conv_general_dilated if first else None
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
                   use_bias=self.norm == 'none',
                   conv_general_dilated=conv or self.conv_general_dilated, name=name)

  def _dense(self, features: int, name: str, use_bias: bool) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dot_general=self.dot_general, name=name)

  def _normalize(self, x: jax.Array, train: bool, name: str) -> jax.Array:
    if self.norm == 'none':
      return x
    if self.norm == 'batch':
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)(x)
    if self.norm == 'group':
      groups = math.gcd(self.num_groups, x.shape[-1])
      if math.prod(x.shape[1:]) == groups:
        raise ValueError(f'group norm with {groups} groups over {x.shape[1:]} normalizes '
                         f'single values (all outputs 0) at {name}; lower num_groups')
      return nn.GroupNorm(num_groups=groups, name=name)(x)
    if self.norm == 'layer':
      return nn.LayerNorm(reduction_axes=tuple(range(1, x.ndim)), name=name)(x)
    raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}')

  def _logits(self, x_BxF: jax.Array) -> jax.Array:
    dense = nn.Dense(self.num_classes, dot_general=self.logits_dot_general or self.dot_general,
                     name='logits')
    return dense(x_BxF).astype(jnp.float32)


class ConvNet(_Classifier):
  """Collins et al. 2019 (papers.md section 4) MNIST CNN.

  x -> [Conv kxk stride 2 -> norm -> relu] for each of `features` -> flatten -> logits.
  Defaults: 3 conv layers of 32/16/8 filters, 5x5, stride 2.
  """
  features: Sequence[int] = (32, 16, 8)
  kernel_size: int = 5

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    x = x_BxHxWxC
    for i, f in enumerate(self.features):
      x = self._conv(f, self.kernel_size, 2, f'conv_{i}', first=i == 0)(x)
      x = nn.relu(self._normalize(x, train, f'norm_{i}'))
    return self._logits(x.reshape(x.shape[0], -1))


class MLP(_Classifier):
  """Collins et al. 2019 (papers.md section 4) MNIST MLP.

  x -> flatten -> [Dense -> norm -> relu] for each of `features` -> logits.
  Defaults: 3 hidden layers of 100 units.
  """
  features: Sequence[int] = (100, 100, 100)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for i, f in enumerate(self.features):
      x = self._dense(f, f'dense_{i}', use_bias=self.norm == 'none')(x)
      x = nn.relu(self._normalize(x, train, f'norm_{i}'))
    return self._logits(x)


class ResNet(_Classifier):
  """CIFAR-style ResNet (He et al. 2016, section 4.2): depth = 6n + 2.

  conv3x3(16w) -> norm -> relu -> 3 stages of n basic blocks with 16w/32w/64w channels
  (stride 2 at the start of stages 2 and 3) -> global average pool -> logits.
  Basic block: out = relu(norm(conv3x3(relu(norm(conv3x3(x))))) + shortcut(x)), the
  shortcut a 1x1 strided conv + norm where the shape changes (option B), else x.
  ResNet-20: depth=20; ResNet-32: depth=32. `width` multiplies all channel counts.
  """
  depth: int = 20
  width: int = 1

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {self.depth}')
    blocks_per_stage = (self.depth - 2) // 6
    x = self._conv(16 * self.width, 3, 1, 'stem_conv', first=True)(x_BxHxWxC)
    x = nn.relu(self._normalize(x, train, 'stem_norm'))
    for stage in range(3):
      channels = 16 * self.width * 2 ** stage
      for b in range(blocks_per_stage):
        stride = 2 if stage > 0 and b == 0 else 1
        x = self._block(x, channels, stride, train, f'stage{stage}_block{b}')
    return self._logits(jnp.mean(x, axis=(1, 2)))

  def _block(self, x: jax.Array, channels: int, stride: int, train: bool,
             name: str) -> jax.Array:
    h = self._conv(channels, 3, stride, f'{name}_conv0')(x)
    h = nn.relu(self._normalize(h, train, f'{name}_norm0'))
    h = self._conv(channels, 3, 1, f'{name}_conv1')(h)
    h = self._normalize(h, train, f'{name}_norm1')
    if stride != 1 or x.shape[-1] != channels:
      x = self._conv(channels, 1, stride, f'{name}_proj')(x)
      x = self._normalize(x, train, f'{name}_proj_norm')
    return nn.relu(h + x)


MODELS: dict[str, Any] = {'cnn': ConvNet, 'mlp': MLP, 'resnet': ResNet}
