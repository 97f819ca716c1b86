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


def test_breakdown_by_phase_and_scope(tmp_path):
  """Kernels are found in the program's text by name ('fusion_1' is %fusion.1), filed by
  their op_name's phase and innermost module (digits as N); library kernels without an
  HLO name by library; per step."""
  path = _write_trace(str(tmp_path))
  hlo = ('ENTRY %main {\n'
         '  %fusion.1 = bf16[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/'
         'transpose(jvp(TransformerLM))/TransformerLM.features/stack/block_3/mlp/fc_in/add"}\n'
         '  ROOT %gemm = bf16[8]{0} custom-call(%p)\n}\n')
  b = traces.breakdown(path, hlo, steps=2)
  assert b['device_ms_per_step'] == pytest.approx(0.075) and b['kernels_per_step'] == 1.5
  assert b['categories'] == {
      '? / cublas': {'ms_per_step': pytest.approx(0.05), 'kernels_per_step': 0.5},
      'backward / fc_in': {'ms_per_step': pytest.approx(0.025), 'kernels_per_step': 1.0}}
  assert [k['kernel'] for k in b['top_kernels']] == ['gemm', 'fusion_1']
  assert traces.category('jit(train_step)/jvp(ResNet)/ResNet._block/stage1_block0_conv1/'
                         'reduce_sum', 'x') == 'forward / stageN_blockN_convN'
  assert traces.category('jit(train_step)/jvp()/reduce', 'x') == 'forward / loss'
  assert traces.category('jit(train_step)/add', 'x') == 'update / other'
  assert traces.category('', 'cudnn_generated_fort_native_sdpa') == '? / cudnn'
