"""Preparing a tfds dataset once, and never reading one that is half-written.

`prepare(builder_cls, **kwargs)` makes the builder and writes its array_record files once,
under an exclusive file lock beside the dataset's folder (runs started side by side, as in a
parallel sweep, would otherwise prepare it together and collide renaming it into place).

tfds writes into `<name>/<config>/incomplete.XXXXXX_<version>/` and renames that to
`<version>/` when every split is written, so an interrupted preparation (killed, out of
disk, a bad archive) never leaves a `<version>/` folder behind. Two things it does not
guard against are checked here, under the lock, before a prepared dataset is used:
- a `<version>/` folder that is incomplete all the same (copied or synced in part, a shard
  truncated, `dataset_info.json` missing or unreadable): `problems(builder)` lists what is
  wrong — each split's shard files must exist and hold the number of records its metadata
  records — and such a folder is deleted and prepared again, with a warning naming why;
- `incomplete.*` folders left by a preparation that was killed: deleted (the lock is held,
  so no preparation of this dataset is running).
A dataset that is still wrong right after its own preparation is a UserError.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
from typing import Callable

import tensorflow_datasets as tfds
from array_record.python import array_record_module

from accel.errors import UserError

INCOMPLETE_PREFIX = 'incomplete.'
INFO_FILE = 'dataset_info.json'


def _shard_records(path: str) -> int | None:
  """Records in one array_record file; None where its footer is unreadable (truncated)."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
    records = reader.num_records()
    reader.close()                 # a damaged file fails here at the latest
  except RuntimeError:
    return None
  return records


def problems(builder: tfds.core.DatasetBuilder) -> list[str]:
  """What makes the prepared folder of `builder` unusable; [] when it is complete."""
  folder = builder.data_dir
  if not os.path.exists(os.path.join(folder, INFO_FILE)):
    return [f'{INFO_FILE} is missing']
  if not builder.info.splits:
    return ['its metadata lists no split']
  found = []
  for name, split in builder.info.splits.items():
    for path, expected in zip(split.filepaths, split.shard_lengths):
      if not os.path.exists(path):
        found.append(f'split {name}: {os.path.basename(path)} is missing')
      elif (records := _shard_records(os.fspath(path))) != expected:
        found.append(f'split {name}: {os.path.basename(path)} ' + (
            'is unreadable' if records is None else
            f'holds {records} of its {expected} records'))
  return found


def _remove_leftovers(dataset_dir: str) -> None:
  """incomplete.* folders of preparations that were killed (the caller holds the lock)."""
  parent = os.path.dirname(dataset_dir)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith(INCOMPLETE_PREFIX):
      logging.warning('removing %s, left by an interrupted preparation',
                      os.path.join(parent, entry))
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _make(builder_cls, data_dir: str, kwargs) -> tfds.core.DatasetBuilder:
  try:
    return builder_cls(data_dir=data_dir, **kwargs)
  except tfds.core.dataset_info.DatasetInfoFileError as e:
    raise UserError(f'a prepared {builder_cls.name} dataset in {data_dir} has an unreadable '
                    f'{INFO_FILE} ({e}); delete its folder and run again') from e


def prepare(builder_cls: Callable[..., tfds.core.DatasetBuilder], *, data_dir: str,
            **kwargs) -> tfds.core.DatasetBuilder:
  """`builder_cls(data_dir=data_dir, **kwargs)`, prepared and complete (module docstring)."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'{builder_cls.name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = _make(builder_cls, data_dir, kwargs)
    _remove_leftovers(builder.data_dir)
    if os.path.exists(builder.data_dir):
      found = problems(builder)
      if found:
        logging.warning('%s is incomplete (%s); preparing it again', builder.data_dir,
                        '; '.join(found[:3]))
        shutil.rmtree(builder.data_dir)
        builder = _make(builder_cls, data_dir, kwargs)
    builder.download_and_prepare()
    found = problems(builder)
    if found:
      raise UserError(f'{builder.data_dir} is incomplete right after its preparation '
                      f'({"; ".join(found[:3])})')
  return builder
