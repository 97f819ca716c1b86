"""Orbax checkpoints of the whole train state (params, optimizer, step, method buffers).

The data loader's state is the step (see `accel.data.input_pipeline`), so restoring the train
state restores the exact batch order too. Saves are asynchronous; the last `keep` are kept.
Orbax writes each into a temporary folder and renames it whole when complete, so a save
cut short (a kill, a full disk) is never read back; `intact()` says which one a failure left.
A checkpoint that does not restore is reported in accel's words, and left as it is.
"""
from __future__ import annotations

import os
import threading

import jax
import orbax.checkpoint as ocp

from accel.errors import UserError


class Checkpoints:
  """`WORKDIR/checkpoints/<step>/`, one folder per saved step (made by the first save)."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps_on_disk(self) -> list[int]:
    """The steps whose folders are complete (renamed from their temporary names)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  def intact(self) -> str:
    """Which checkpoint a failure now leaves for the rerun, as the end of an error line."""
    steps = self.steps_on_disk()
    if not steps:
      return 'no checkpoint had been written'
    return (f'the checkpoint of step {steps[-1]} in {self.directory} is intact; run the same '
            'command to resume from it')

  def save(self, step: int, state) -> None:
    os.makedirs(self.directory, exist_ok=True)
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, state_like):
    """The latest checkpoint, with the shapes, dtypes and shardings of `state_like`."""
    step = self.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable or mismatched files
      raise self._unrestorable(step, e) from e

  def _unrestorable(self, step: int, e: Exception) -> UserError:
    folder = os.path.join(self.directory, str(step))
    state = os.path.join(folder, 'default')
    text = str(e)
    if not os.path.isdir(state):
      reason = 'its train state folder default/ is missing'
    elif not os.path.exists(os.path.join(state, '_METADATA')):
      reason = "default/_METADATA, the state's structure, is missing"
    elif 'structure' in text:
      reason = ("its train state's structure is not this run's (a checkpoint of another "
                'model, or of another version of accel?)')
    else:
      reason = f'its data does not read back ({type(e).__name__})'
    earlier = [s for s in self.steps_on_disk() if s < step]
    move = (f'move it away to resume from step {earlier[-1]}' if earlier else 'move it away')
    return UserError(f'checkpoint {folder} is damaged or incomplete: {reason}; it was left as '
                     f'it is — {move}, or use a new --workdir')

  def wait(self, timeout: float | None = None) -> bool:
    """Waits for the save in flight; False if it is still writing after `timeout` s."""
    if timeout is None:
      self._manager.wait_until_finished()
      return True
    failure = []

    def wait():
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # re-raised in the caller's thread
        failure.append(e)
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout)
    if failure:
      raise failure[0]
    return not waiter.is_alive()

  def close(self) -> None:
    self._manager.close()
