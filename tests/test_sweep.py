"""Sweeps: declaration helpers, run names, targets, summaries; a 3-run smoke sweep with one
failure, resumed and retried."""
import csv
import json
import os
import subprocess
import sys

import pytest

from accel import sweep
from accel.sweep import declare, runner, slurm, summary
from accel.sweep import status as status_lib
from accel.errors import UserError
from tests.helpers import ROOT


def test_product_crosses_axes_later_fastest():
  runs = sweep.product({'optimizer.lr': [1e-4, 3e-4]}, {'seed': [0, 1, 2]})
  assert runs == [{'optimizer.lr': lr, 'seed': s} for lr in (1e-4, 3e-4) for s in (0, 1, 2)]
  # A dict with two axes is crossed too; a list of override dicts is an inner sweep.
  assert sweep.product({'a': [1, 2], 'b': [3]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]
  assert sweep.product([{'a': 1}, {'a': 2, 'b': 0}], {'c': [5]}) == [
      {'a': 1, 'c': 5}, {'a': 2, 'b': 0, 'c': 5}]


def test_zip_pairs_axes_and_rejects_unequal_lengths():
  assert sweep.zip({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  assert sweep.zip([{'a': 1}, {'a': 2}], {'b': [7, 8]}) == [{'a': 1, 'b': 7}, {'a': 2, 'b': 8}]
  nested = sweep.product(sweep.zip({'lr': [1, 2], 'wu': [10, 20]}), {'seed': [0, 1]})
  assert len(nested) == 4 and nested[3] == {'lr': 2, 'wu': 20, 'seed': 1}
  with pytest.raises(UserError, match='one length'):
    sweep.zip({'a': [1, 2], 'b': [3]})


def test_parse_axis():
  assert sweep.parse_axis('optimizer.lr=1e-4, 3e-4') == {'optimizer.lr': ['1e-4', '3e-4']}
  for bad in ('optimizer.lr', '=1,2', 'seed='):
    with pytest.raises(UserError, match='KEY=VALUE'):
      sweep.parse_axis(bad)


def test_run_names_are_safe_and_distinct():
  assert sweep.run_name({}) == 'base'
  assert sweep.run_name({'optimizer.lr': 3e-4, 'seed': 1}) == 'optimizer.lr=0.0003,seed=1'
  assert sweep.run_name({'layerdrop.enabled': True}) == 'layerdrop.enabled=true'
  a = sweep.run_name({'data.path': '/a/b c'})
  b = sweep.run_name({'data.path': '/a/b_c'})
  assert a != b and '/' not in a and ' ' not in a
  long = sweep.run_name({'k' * 200: 1})
  assert len(long) <= declare.MAX_NAME_CHARS
  assert long != sweep.run_name({'k' * 201: 1})
  with pytest.raises(UserError, match='more than once'):
    sweep.make_runs('configs/lm.py', [{'seed': 1}, {'seed': 1}])


def test_run_command_passes_overrides_as_config_flags():
  run = sweep.Run('configs/lm.py:smoke', {'optimizer.lr': 0.001, 'layerdrop.enabled': False})
  command = run.command('/tmp/w')
  assert command[1:3] == ['-m', 'experiments.train']
  assert f'--config={os.path.abspath("configs/lm.py")}:smoke' in command
  assert '--config.optimizer.lr=0.001' in command
  assert '--config.layerdrop.enabled=false' in command
  assert command[-1] == '--workdir=/tmp/w'


def test_target_parse_and_direction():
  t = summary.Target.parse('eval/loss<=2.5')
  assert (t.metric, t.op, t.value) == ('eval/loss', '<=', 2.5)
  assert t.met(2.5) and not t.met(2.6)
  assert summary.Target.parse('eval/accuracy >= 0.9').met(0.95)
  with pytest.raises(UserError, match='METRIC<=VALUE'):
    summary.Target.parse('eval/loss=2')
  assert summary.higher_is_better('eval/accuracy')
  assert not summary.higher_is_better('eval/loss')
  assert not summary.higher_is_better('eval/bits_per_byte')


def test_slurm_array_spec_and_options(tmp_path):
  assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'
  assert slurm.array_spec([3], max_running=2) == '3%2'
  assert slurm.submit_commands('/s/a.sbatch', '/s/b.sbatch') == (
      'job=$(sbatch --parsable /s/a.sbatch) && '
      'sbatch --dependency=afterany:"${job%%;*}" /s/b.sbatch')
  for reserved in ('--array=0-3', '--ntasks=2', '-n 2', '--output=x.out'):
    with pytest.raises(UserError, match='the sweep sets'):
      slurm.write_scripts(str(tmp_path), 'j', ['t'], ['s'], [0], '/', [reserved])
  with pytest.raises(UserError, match='expected an sbatch option'):
    slurm.write_scripts(str(tmp_path), 'j', ['t'], ['s'], [0], '/', task_options=['gpu:1'])
  assert not os.path.exists(tmp_path / 'slurm')   # refused before writing


def test_gpu_groups_split_visible_devices(monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3')
  assert runner.gpu_groups(2) == ['0,1', '2,3']
  assert runner.gpu_groups(4) == ['0', '1', '2', '3']
  with pytest.raises(UserError, match='neither divides'):
    runner.gpu_groups(3)
  assert runner.gpu_groups(8) == ['0', '1', '2', '3'] * 2 and runner.sharing(
      runner.gpu_groups(8)) == 2
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0')    # four small runs side by side on one GPU
  assert runner.gpu_groups(4) == ['0'] * 4 and runner.sharing(runner.gpu_groups(4)) == 4
  assert runner.device_env(sweep.Run('configs/lm.py', {}), '0', 4) == {
      'CUDA_VISIBLE_DEVICES': '0', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.225'}
  assert runner.sharing([None, None]) == 1 and runner.sharing(['0,1', '2,3']) == 1


def test_summary_of_synthetic_run(tmp_path):
  """Final/best values, step time median, training seconds and steps to a target."""
  lines = [
      {'step': 10, 'train/loss': 3.0, 'perf/step_time_s': 0.5},
      {'step': 20, 'train/loss': 2.5, 'perf/step_time_s': 0.1, 'eval/loss': 2.4,
       'eval/accuracy': 0.3},
      {'step': 30, 'train/loss': 2.0, 'perf/step_time_s': 0.2},
      {'step': 40, 'train/loss': 1.9, 'perf/step_time_s': 0.2, 'eval/loss': 2.6,
       'eval/accuracy': 0.5}]
  run = sweep.Run('configs/lm.py', {'seed': 3})
  run_dir = tmp_path / run.name
  run_dir.mkdir()
  (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  assert summary.train_seconds(lines) == pytest.approx([5.0, 6.0, 8.0, 10.0])
  targets = [summary.Target.parse('eval/loss<=2.5'), summary.Target.parse('eval/accuracy>=0.9')]
  row = summary.summarize(run, str(run_dir), {'state': 'finished', 'wall_s': 12.0},
                        ['eval/loss', 'eval/accuracy'], targets)
  assert row['seed'] == '3' and row['step'] == 40 and row['state'] == 'finished'
  assert row['final eval/loss'] == 2.6 and row['best eval/loss'] == 2.4
  assert row['final eval/accuracy'] == 0.5 and row['best eval/accuracy'] == 0.5
  assert row['step time (s)'] == 0.2 and row['train time (s)'] == pytest.approx(10.0)
  assert row['steps to eval/loss<=2.5'] == 20
  assert row['train s to eval/loss<=2.5'] == pytest.approx(6.0)
  assert row['steps to eval/accuracy>=0.9'] is None
  table = summary.markdown_table([row])
  assert table.splitlines()[0].startswith('| run | seed | state | step | final eval/loss')
  assert '| seed=3 | 3 | finished | 40 | 2.6 | 2.4 |' in table


_CLI_ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}


def _sweep_cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'experiments.sweep', *args], cwd=ROOT,
                        env={**_CLI_ENV, **(env or {})}, capture_output=True, text=True,
                        timeout=300)


def test_smoke_sweep_with_a_failure_resume_and_retry(tmp_path):
  """Three smoke runs, one with a bad optimizer name, as a Slurm array job: each array task's
  script runs here with SLURM_ARRAY_TASK_ID set (and the rest of a one-task Slurm step, so
  training stays one process), then the summary job's. Two finish, the failure is recorded
  with its error. The local launcher then reads the same records: a rerun skips the finished
  ones, resumes an interrupted one and retries the failure only when asked."""
  sweep_dir = str(tmp_path / 'sweep')
  # The resumed run compiles what its first attempt did: JAX's persistent cache makes that a
  # read (about 5 of its 10 CPU seconds here). XLA's backend optimizations are off for
  # every test (conftest), its subprocesses too.
  env = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}
  args = ['--config=configs/lm.py:smoke', f'--sweep_dir={sweep_dir}', '--parallel=2',
          '--sweep=total_steps=4', '--sweep=optimizer.name=adamw,nosuch,sgd',
          '--target=train/loss<=100']
  # Written and submitted through an `sbatch` that records its arguments and answers job 77.
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  (fake_bin / 'sbatch').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "sbatch.log"}\n'
                                   'echo "77;cluster"\n')
  (fake_bin / 'sbatch').chmod(0o755)
  written = _sweep_cli(*args, '--launcher=slurm', '--submit', '--slurm_option=--partition=cpu',
                       '--slurm_task_option=--time=00:10:00',
                       env={**env, 'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}'})
  assert written.returncode == 0, written.stderr
  array_script = os.path.join(sweep_dir, 'slurm', 'array.sbatch')
  summary_script = os.path.join(sweep_dir, 'slurm', 'summary.sbatch')
  assert 'submitted array job 77, summary job 77 after it' in written.stdout
  assert (tmp_path / 'sbatch.log').read_text().splitlines() == [
      f'--parsable {array_script}', f'--parsable --dependency=afterany:77 {summary_script}']
  with open(array_script) as f:
    array = f.read()
  with open(summary_script) as f:
    summary_job = f.read()
  assert '#SBATCH --array=0-2%2\n#SBATCH --ntasks=1\n' in array
  assert '#SBATCH --partition=cpu' in array and '#SBATCH --time=00:10:00' in array
  assert '#SBATCH --partition=cpu' in summary_job and '--time' not in summary_job
  assert array.rstrip().endswith('--run_index="$SLURM_ARRAY_TASK_ID"')
  assert '--summary_only' in summary_job and '--target=train/loss<=100' in summary_job
  names = [f'total_steps=4,optimizer.name={o}' for o in ('adamw', 'nosuch', 'sgd')]
  assert not any(os.path.exists(os.path.join(sweep_dir, n)) for n in names)   # nothing ran

  slurm_step = {'SLURM_JOB_ID': '777', 'SLURM_STEP_NODELIST': 'localhost', 'SLURM_NTASKS': '1',
                'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
  tasks = [subprocess.Popen(['bash', array_script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**_CLI_ENV, **env, **slurm_step,
                                 'SLURM_ARRAY_TASK_ID': str(i)})
           for i in range(3)]
  logs = [t.communicate(timeout=300)[0] for t in tasks]
  assert [t.returncode for t in tasks] == [0, 1, 0], logs   # task i ran run i
  assert f'start {names[1]}' in logs[1] and names[0] not in logs[1]
  summarized = subprocess.run(['bash', summary_script], env={**_CLI_ENV, **env, **slurm_step},
                              capture_output=True, text=True, timeout=300)
  assert summarized.returncode == 1, summarized.stderr   # one run failed

  status = {n: status_lib.read_status(os.path.join(sweep_dir, n)) for n in names}
  assert [status[n]['state'] for n in names] == ['finished', 'failed', 'finished']
  assert status[names[1]]['error'] == ("unknown optimizer.name 'nosuch'; known: adamw, adam, "
                                       'sgd, rmsprop, muon')
  for n in (names[0], names[2]):
    steps = [l['step'] for l in summary.read_metrics(os.path.join(sweep_dir, n))]
    assert steps[-1] == 4
  with open(os.path.join(sweep_dir, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['state'] for r in rows] == ['finished', 'failed', 'finished']
  assert [r['steps to train/loss<=100'] for r in rows] == ['4', '', '4']
  assert os.path.getsize(os.path.join(sweep_dir, 'summary.png')) > 1000

  # A rerun skips all three: two finished, one failed (nothing is trained).
  second = _sweep_cli(*args, env=env)
  assert second.returncode == 1
  assert f'skip {names[0]}: finished' in second.stdout
  assert f'skip {names[1]}: failed' in second.stdout
  assert f'skip {names[2]}: finished' in second.stdout and 'start' not in second.stdout

  # Interrupt the sgd run's record (its process is gone): the next rerun resumes it from its
  # checkpoint and, with --retry_failed, retries the failure; the finished run stays skipped.
  interrupted = {**status[names[2]], 'state': 'running', 'pid': 2 ** 22 + 1}
  status_lib.write_status(os.path.join(sweep_dir, names[2]), interrupted)
  third = _sweep_cli(*args, '--retry_failed', env=env)
  assert f'skip {names[0]}: finished' in third.stdout
  assert f'start {names[1]}' in third.stdout and f'start {names[2]}' in third.stdout
  assert status_lib.read_status(os.path.join(sweep_dir, names[0]))['attempts'] == 1
  resumed = status_lib.read_status(os.path.join(sweep_dir, names[2]))
  assert (resumed['state'], resumed['attempts']) == ('finished', 2)
  assert [l['step'] for l in summary.read_metrics(os.path.join(sweep_dir, names[2]))] == [4]
  retried = status_lib.read_status(os.path.join(sweep_dir, names[1]))
  assert (retried['state'], retried['attempts']) == ('failed', 2)


def test_plan_of_recorded_states():
  run = sweep.Run('configs/lm.py:smoke', {'seed': 1})
  record = {'config': run.config, 'overrides': {'seed': 1}}
  assert status_lib.plan(run, None, False) == 'run'
  assert status_lib.plan(run, {**record, 'state': 'finished'}, True) == 'finished'
  assert status_lib.plan(run, {**record, 'state': 'failed'}, False) == 'failed'
  assert status_lib.plan(run, {**record, 'state': 'failed'}, True) == 'run'
  alive = {**record, 'state': 'running', 'pid': os.getpid(),
           'host': status_lib.socket.gethostname()}
  assert status_lib.plan(run, alive, False) == 'running elsewhere'
  assert status_lib.plan(run, {**alive, 'pid': 2 ** 22 + 1}, False) == 'run'
  with pytest.raises(UserError, match='holds another run'):
    status_lib.plan(run, {**record, 'overrides': {'seed': 2}, 'state': 'finished'}, False)


def test_devices_per_run(monkeypatch, tmp_path):
  run = sweep.Run('configs/lm.py', {'seed': 0}, devices=2)
  assert run.name == 'seed=0,devices=2'
  assert sweep.Run('configs/lm.py', {}, devices=3).name == 'devices=3'
  assert runner.device_env(run, None) == {'JAX_NUM_CPU_DEVICES': '2'}
  assert runner.device_env(run, '4,5,6') == {'CUDA_VISIBLE_DEVICES': '4,5'}
  assert runner.device_env(sweep.Run('configs/lm.py', {}), '4,5') == {
      'CUDA_VISIBLE_DEVICES': '4,5'}
  assert runner.device_env(sweep.Run('configs/lm.py', {}), None) == {}
  with pytest.raises(UserError, match='needs 2 GPUs, its slot has 1'):
    runner.device_env(run, '7')
  # Two runs side by side on two GPUs: one GPU each, too few; refused before anything runs.
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1')
  other = sweep.Run('configs/lm.py', {'seed': 1}, devices=2)
  with pytest.raises(UserError, match='needs 2 GPUs, its slot has 1'):
    runner.run_sweep([run, other], str(tmp_path), parallel=2, log=lambda m: None)
  assert not os.path.exists(tmp_path / run.name)


@pytest.mark.parametrize('stop, state, error', [
    ('os.kill(os.getpid(), signal.SIGTERM)', 'interrupted', None),
    ('sys.exit(143)', 'interrupted', None),     # experiments.train stopped by SIGTERM
    ('os.kill(os.getpid(), signal.SIGKILL)', 'failed', 'killed by SIGKILL')])
def test_signalled_run_is_interrupted_or_failed(tmp_path, stop, state, error):
  """A run stopped by SIGTERM (killed by it, or exiting 128 + 15 as experiments.train does)
  is resumed by the next sweep; one killed (e.g. out of memory) is a failure."""
  config = tmp_path / 'signal_config.py'
  config.write_text(f'import os, signal, sys\n\ndef get_config():\n  {stop}\n')
  run = sweep.Run(str(config), {})
  status = runner.run_sweep([run], str(tmp_path / 'sweep'), log=lambda m: None)[run.name]
  assert (status['state'], status.get('error')) == (state, error)
  plan = status_lib.plan(run, status, retry_failed=False)
  assert plan == ('run' if state == 'interrupted' else 'failed')


def test_get_sweep_in_the_config_file_declares_the_runs(tmp_path):
  """Without --sweep the config file's get_sweep(preset) gives the runs (here two that fail
  fast on a bad optimizer name, so nothing trains)."""
  config = tmp_path / 'swept.py'
  config.write_text(
      'from accel import sweep\nfrom configs import lm\n\n'
      'def get_config(arg):\n  return lm.get_config(arg)\n\n'
      'def get_sweep(arg):\n  assert arg == "smoke"\n'
      '  return sweep.product({"optimizer.name": ["bad1", "bad2"]}, {"seed": [7]})\n')
  sweep_dir = tmp_path / 'sweep'
  done = _sweep_cli(f'--config={config}:smoke', f'--sweep_dir={sweep_dir}', '--parallel=2')
  assert done.returncode == 1
  for bad in ('bad1', 'bad2'):
    status = status_lib.read_status(str(sweep_dir / f'optimizer.name={bad},seed=7'))
    assert status['state'] == 'failed' and f"unknown optimizer.name '{bad}'" in status['error']
  with open(sweep_dir / 'summary.md') as f:
    assert f.read().count('| failed |') == 2
