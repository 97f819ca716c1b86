"""TPU readiness on paper: the train steps accel's trainers build lower for TPU on this CPU
machine (`jax.export`, platforms=('tpu',)): lowering only, nothing compiled or run.

One case per method, each on its own paper's tiny config, plus the plain spine and the
Ouroboros pipeline; each step is built as the loop builds it (`accel.train.build`: the task,
the methods, `accel.trainer.build_trainer`), over a 2-device data mesh (the pipeline: its 2
stages), with the plan the methods decide on the host. jax.export refuses custom calls it
does not know to be stable on the target. The lowprec Pallas kernels (Triton) have no TPU
lowering: with impl='pallas' a GEMM lowered for TPU takes the JAX path
(`accel.lowprec.gemm._gemm`, lax.platform_dependent), checked at the end.

Runs in a subprocess with 2 simulated CPU devices (the pytest process started jax with one).
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

# name: (config module, preset, overrides, step whose plan the step gets)
CASES = {
    'spine': ('lm', 'smoke', {}, 0),
    'layerdrop': ('pld_bert', 'smoke', {}, 19),           # late: theta near theta_bar
    'stdloss': ('stdloss_mnist', 'smoke,mlp,stdloss', {}, 0),
    'lowprec': ('fp8_lm', 'smoke', {'model.num_layers': 1}, 0),
    'pipeline': ('ouroboros_lm', 'smoke', {'pipeline.num_modules': 3}, 0),   # 2 stages
}
DEVICES = 2


def _export_case(module: str, preset: str, overrides: dict, plan_step: int) -> dict:
  import importlib  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from accel import train  # pylint: disable=g-import-not-at-top
  from accel.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{module}').get_config(preset)
  for key, value in overrides.items():
    *path, last = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  data = input_pipeline.build(config)
  task, trainer = train.build(config, data.info)
  abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  batch = jax.tree.map(abstract, data.train(0))
  state = jax.eval_shape(trainer.init, jax.random.key(config.seed), batch)
  plan = jax.tree.map(abstract, task.methods.plan(plan_step).model_kwargs)
  exported = export.export(trainer.train_step, platforms=('tpu',))(state, batch, plan)
  text = exported.mlir_module()
  return {'methods': list(task.methods.names), 'platforms': list(exported.platforms),
          'devices': exported.nr_devices, 'plan': sorted(plan),
          'custom_calls': sorted(set(re.findall(r'custom_call @([\w$.]+)', text))),
          'collective_permutes': text.count('stablehlo.collective_permute')}


@pytest.fixture(scope='module')
def exported():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
             PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(json.loads(line[len('CASE '):]) for line in proc.stdout.splitlines()
              if line.startswith('CASE '))


@pytest.mark.parametrize('name', CASES)
def test_train_step_exports_for_tpu(exported, name):
  got = exported[name]
  assert got['platforms'] == ['tpu'] and got['devices'] == DEVICES
  assert not [c for c in got['custom_calls'] if 'triton' in c.lower()], got['custom_calls']
  method = {'spine': [], 'layerdrop': ['layerdrop'], 'stdloss': ['stdloss'],
            'lowprec': ['lowprec'], 'pipeline': ['pipeline']}[name]
  assert got['methods'] == method
  if name == 'layerdrop':
    assert got['plan'] == ['keep_probs_N', 'layer_ids_N']   # the host-decided kept blocks
  if name == 'pipeline':
    assert got['collective_permutes'] > 0   # activations and gradients passed between stages


def test_pallas_gemms_take_the_jax_path_when_lowered_for_tpu():
  """impl='pallas': lowered for CPU the GEMMs hold the (interpreted) kernels, as on GPU;
  lowered for TPU none, the same while loops as impl='jax'."""
  from accel.lowprec import gemm  # pylint: disable=g-import-not-at-top
  a = jax.ShapeDtypeStruct((64, 64), np.float32)
  w = jax.ShapeDtypeStruct((64, 32), np.float32)

  def lowered(impl, platform):
    s = gemm.GemmSettings('e5m2', 'e6m9', chunk_size=16, mode='fast', impl=impl)
    dot = gemm.LowPrecDotGeneral(gemm.LayerSettings(s, s, s))
    f = jax.jit(lambda a, w: dot(a, w, (((1,), (0,)), ((), ()))))
    return f.trace(a, w).lower(lowering_platforms=(platform,)).as_text(debug_info=True)

  on_cpu, on_tpu = lowered('pallas', 'cpu'), lowered('pallas', 'tpu')
  assert 'pallas_call' in on_cpu and 'pallas_call' not in on_tpu
  assert on_tpu.count('stablehlo.while') == lowered('jax', 'tpu').count('stablehlo.while')


if __name__ == '__main__':
  for case_name, args in CASES.items():
    print('CASE ' + json.dumps([case_name, _export_case(*args)]), flush=True)
