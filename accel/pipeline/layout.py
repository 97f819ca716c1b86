"""How an L-block TransformerLM is cut into K pipeline modules and placed on stages.

Module j (j = 0..K-1) is a run of consecutive blocks; module 0 also owns the input
embedding (token table E and positions P), module K-1 the final LayerNorm and the tied
output projection logits = LN_f(h) @ E^T. E itself is shared by modules 0 and K-1.

Tied ring (`tied_ring=True`, Ouroboros section 3): S = K-1 stages; stage 0 holds module 0
and module K-1 (so E lives in one place), stage s = 1..S-1 holds module s, and the
activations go round the ring S-1 -> 0. Every stage holds n = L/S blocks: stage 0 splits
its n into n_first = n - n//2 blocks for module 0 and n_last = n//2 for module K-1, so the
stages stay balanced.
Untied layout (`tied_ring=False`): S = K stages, stage s holds module s (n = L/K blocks);
stage 0 and stage K-1 each keep a copy of E and add each other's gradient part, so the
copies stay equal and the model is still the tied one.

Per stage the blocks are stored as one [n, ...] stack (scan layout). `stage_order` maps the
model's layer axis to the stage-major order: stacked_SxN = roll(layers_L, n_last)[S, n],
so stage 0's local stack is [module K-1 blocks, module 0 blocks].
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
  num_layers: int    # L
  num_modules: int   # K
  tied_ring: bool

  def __post_init__(self):
    if self.num_modules < 2:
      raise ValueError(f'num_modules must be >= 2, got {self.num_modules}')
    if self.num_layers % self.num_stages:
      raise ValueError(f'num_layers={self.num_layers} must be divisible by the '
                       f'{self.num_stages} stages')

  @property
  def num_stages(self) -> int:
    return self.num_modules - 1 if self.tied_ring else self.num_modules

  @property
  def layers_per_stage(self) -> int:
    return self.num_layers // self.num_stages

  @property
  def n_last(self) -> int:
    """Blocks of module K-1 (tied ring: the second half of stage 0's blocks)."""
    n = self.layers_per_stage
    return n // 2 if self.tied_ring else n

  @property
  def n_first(self) -> int:
    n = self.layers_per_stage
    return n - n // 2 if self.tied_ring else n

  def module_ranges(self) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each module's blocks in model layer order."""
    k, n = self.num_modules, self.layers_per_stage
    sizes = [self.n_first] + [n] * (k - 2) + [self.n_last]
    starts = [sum(sizes[:j]) for j in range(k)]
    return tuple((s, s + m) for s, m in zip(starts, sizes))

  def stage_of(self, module: int) -> int:
    if self.tied_ring and module == self.num_modules - 1:
      return 0
    return module

  def delay(self, module: int) -> int:
    """Iterations between module j's forward of a batch and its backward of it: 2(K-1-j)."""
    return 2 * (self.num_modules - 1 - module)

  @property
  def roll(self) -> int:
    """Shift of the layer axis that makes the stage-major block stack (see docstring)."""
    return self.n_last if self.tied_ring else 0
