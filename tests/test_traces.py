"""Reading perfetto traces: device kernels summed per name, host threads left out, each
device stream's busy time against its span."""
import gzip
import json
import os

import pytest

from accel import traces


def _write_trace(directory):
  events = [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 7, 'args': {'name': 'Stream #1'}},
      {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'fusion_1', 'ts': 100, 'dur': 30},
      {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'fusion_1', 'ts': 200, 'dur': 20},
      {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'gemm', 'ts': 300, 'dur': 100},
      {'ph': 'X', 'pid': 2, 'tid': 3, 'name': 'host_work', 'ts': 0, 'dur': 1000},
  ]
  path = os.path.join(directory, 'plugins', 'profile', 'run', 'perfetto_trace.json.gz')
  os.makedirs(os.path.dirname(path))
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  return path


def test_kernel_times_and_stream_busy(tmp_path):
  path = _write_trace(str(tmp_path))
  assert traces.find_trace(str(tmp_path)) == path
  totals, names = traces.kernel_times(path)
  assert dict(totals) == {'fusion_1': 50, 'gemm': 100}          # host_work is not a kernel
  assert names == {1: '/device:GPU:0', 2: '/host:CPU'}
  busy = traces.stream_busy(path)
  assert busy == {'/device:GPU:0 / Stream #1': {'busy_ms': pytest.approx(0.15),
                                                'span_ms': pytest.approx(0.3)}}
  with pytest.raises(FileNotFoundError, match='no perfetto_trace.json.gz'):
    traces.find_trace(str(tmp_path / 'plugins' / 'profile' / 'none'))
