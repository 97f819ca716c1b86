"""Orbax checkpoints of the whole train state (params, optimizer, step, method buffers).

The data loader's state is the step (see `accel.data.input_pipeline`), so restoring the train
state restores the exact batch order too. Saves are asynchronous; the last `keep` are kept.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from accel.errors import UserError


class Checkpoints:
  """`WORKDIR/checkpoints/<step>/`, one folder per saved step."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, state_like):
    """The latest checkpoint, with the shapes, dtypes and shardings of `state_like`."""
    step = self.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable or mismatched files
      raise UserError(f'checkpoint {os.path.join(self.directory, str(step))} cannot be '
                      f'restored ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                      'it was left as it is — move it away or use a new --workdir') from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
