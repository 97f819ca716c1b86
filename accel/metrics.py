"""Metric sinks: WORKDIR/metrics.jsonl (one object per logged step) and TensorBoard.

A run that resumes from step S drops what an earlier attempt logged after S (it trains
those steps again): lines of metrics.jsonl, events of tensorboard/ (one event file per
attempt, none overlapping another's steps). That happens at its first write, so a run that
fails before logging anything leaves both as they were. Each line and event is written
whole and flushed; a kill can only tear the last one, which is dropped on resume with a
warning (and skipped by `read_jsonl`).
"""
from __future__ import annotations

import glob
import json
import os
import socket
import struct
import sys
import time

import numpy as np

from accel.errors import UserError

EVENTS_GLOB = 'events.out.tfevents.*'


def _parse_lines(path: str) -> tuple[list[dict], bool]:
  """(lines, whether a torn last line was dropped); UserError for a damaged middle line."""
  with open(path) as f:
    raw = [line for line in f.read().split('\n') if line.strip()]
  lines = []
  for number, line in enumerate(raw, 1):
    try:
      lines.append(json.loads(line))
    except ValueError as e:
      if number == len(raw):
        return lines, True
      raise UserError(f'{path} line {number} is not JSON ({e}); the file was left as it is — '
                      'repair or remove that line') from e
  return lines, False


def read_jsonl(path: str) -> list[dict]:
  """The logged lines of a metrics.jsonl, without a torn last line (a run killed mid-write)."""
  return _parse_lines(path)[0]


class _EventFile:
  """A TensorBoard event file written synchronously (TFRecord framing of Event protos):
  a full disk is an error here, in the loop, not in a background thread."""

  def __init__(self, folder: str):
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    os.makedirs(folder, exist_ok=True)
    self.path = os.path.join(folder, f'events.out.tfevents.{int(time.time()):010d}.'
                                     f'{socket.gethostname()}.{os.getpid()}')
    self._file = open(self.path, 'ab')
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
    data = event.SerializeToString()
    header = struct.pack('<Q', len(data))
    self._file.write(header + struct.pack('<I', masked_crc32c(header)) + data +
                     struct.pack('<I', masked_crc32c(data)))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                         for k, v in values.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self._file.close()


def event_records(path: str) -> list[tuple[bytes, int | None]]:
  """(raw record, step of its scalars or None) for each whole record of an event file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    blob = f.read()
  records, at = [], 0
  while at + 12 <= len(blob):
    (length,) = struct.unpack('<Q', blob[at:at + 8])
    end = at + 12 + length + 4
    if end > len(blob):
      break                                    # torn by a kill
    event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
    records.append((blob[at:end], event.step if event.HasField('summary') else None))
    at = end
  return records


def truncate_events(folder: str, step: int) -> None:
  """Drops the events of steps after `step` from every event file in `folder` (and files
  left holding no scalars)."""
  for path in sorted(glob.glob(os.path.join(folder, EVENTS_GLOB))):
    records = event_records(path)
    kept = [raw for raw, s in records if s is None or s <= step]
    if not any(s is not None and s <= step for _, s in records):
      os.remove(path)
    elif len(kept) < len(records) or sum(map(len, kept)) < os.path.getsize(path):
      tmp = path + '.tmp'
      with open(tmp, 'wb') as f:
        f.write(b''.join(kept))
      os.replace(tmp, path)


class MetricWriter:
  """Appends `{'step': s, name: value, ...}` lines and TensorBoard scalars for a run that
  starts at step `start`; only process 0 writes."""

  def __init__(self, workdir: str, start: int = 0, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard = os.path.join(workdir, 'tensorboard')
    self.start = start
    self.enabled = enabled
    self._events = None
    self._kept = None       # lines up to `start`, to rewrite at the first write if needed
    if enabled and os.path.exists(self.path):
      lines, torn = _parse_lines(self.path)
      if torn:
        print(f'warning: the last line of {self.path} is torn (a run was killed while '
              'writing it); it is dropped', file=sys.stderr, flush=True)
      self._kept = lines if torn else None
      if any(line.get('step', 0) > start for line in lines):
        self._kept = [line for line in lines if line.get('step', 0) <= start]

  def _begin(self) -> None:
    """The first write: drops what an earlier attempt logged after `start`."""
    if self._kept is not None:
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in self._kept)
      os.replace(tmp, self.path)
    truncate_events(self.tensorboard, self.start)
    self._events = _EventFile(self.tensorboard)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    if self._events is None:
      self._begin()
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    self._events.scalars(step, scalars)

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
