"""What the enabled methods change inside the pipeline's pieces of the model.

The data-parallel step runs the model's own apply, where the methods attach through
`Task.apply` / `Task.loss` (`accel.method`). The pipeline runs pieces of the model
(`families`: embed, blocks, head_loss) on different stages and iterations, so two of the
methods' hooks reach the pieces through this object instead:

  outputs(logits)               the head's outputs before the loss: the methods'
                                `transform_outputs` (the low-precision loss scale)
  wrap_blocks(fn, data_axis)    a run of blocks as the methods change it from inside the
                                layers (the standardization loss's gradient identity on the
                                chosen Dense outputs); data_axis: the mesh axis the batch is
                                split over where the blocks run ('data' inside the SPMD
                                program), None where they see the whole batch (the reference)

The model's constructor overrides (an injected dot_general) are already in the pieces'
model config; the initial rounding and the optimizer wrapper act on the pipeline's params
and optimizer (`accel.pipeline.trainer`). The pieces object is hashable with its hooks, so
jitted functions that take it as a static argument compile once per set of hooks.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


def _same(x):
  return x


def _unwrapped(fn, data_axis):
  del data_axis
  return fn


@dataclasses.dataclass(frozen=True)
class MethodHooks:
  outputs: Callable = _same
  wrap_blocks: Callable = _unwrapped
  data_axis: str | None = None

  def blocks(self, fn: Callable) -> Callable:
    """`fn` (a run of blocks) as the methods change it."""
    return self.wrap_blocks(fn, self.data_axis)


NONE = MethodHooks()
