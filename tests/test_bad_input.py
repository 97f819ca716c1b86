"""Bad input and faults (issue 17): one clear line, its exit status, nothing already written
changed (accel/faults.py holds the rule).

Most cases run the command line in this process (tests.helpers.cli_in_process: the flag
parsing, entry point and accel.faults.main of `python -m experiments.train`, without a new
interpreter, jax import and compile each). Subprocesses where the process itself is the
point: signals, a second run on a workdir in use, read-only and full file systems, library
threads' tracebacks after the error line. Every test starts from the shared
`trained_workdir` (conftest: 10 smoke steps, checkpoint 10, metrics at 5 and 10), read or
copied.
"""
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import optax
import pytest

from accel import config_lib, faults, train, trainer
from accel import programs as programs_lib
from accel.data import builders
from accel.errors import ConfigError, UserError
from accel.metrics import event_records, read_jsonl
from tests.conftest import TRAINED_ARGS, TRAINED_STEPS
from tests.helpers import (ROOT, cache_env, cli_command, cli_env, cli_in_process,
                           compilation_cache, run_cli)
from tests.test_train import smoke


@pytest.fixture(scope='module', autouse=True)
def _shared_compiles(compile_cache_dir):
  with compilation_cache(compile_cache_dir):
    yield


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
  monkeypatch.chdir(ROOT)            # the config paths of the command lines are relative


def tree_digest(root):
  digest = hashlib.sha256()
  for folder, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(folder, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def snapshot(root):
  """{path relative to root: bytes} of every file under root."""
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


def assert_kept(before, root, appended=()):
  """Every file of `before` is still under root, byte for byte; those in `appended` may have
  grown (the lines of the steps a run trained), their old bytes first."""
  after = snapshot(root)
  for path, data in before.items():
    assert path in after, path
    if path in appended:
      assert after[path].startswith(data), path
    else:
      assert after[path] == data, path


def assert_one_error_line(result, fragment, code=None):
  assert result.returncode != 0 and (code is None or result.returncode == code), (
      result.returncode, result.stderr[-2000:])
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr[-2000:]
  assert fragment in lines[0], lines[0]
  assert 'Traceback' not in result.stderr


def copy_of(workdir, tmp_path, name='run'):
  return shutil.copytree(workdir, str(tmp_path / name))


# --- bad config ---------------------------------------------------------------------------

@pytest.mark.parametrize('args,fragment,code', [
    (['--config.model.bogus=1'], "unknown config key 'model.bogus'", 2),
    (['--config.model.d_model=abc'], "invalid literal for int()", 2),
    (['--config=configs/lm.py:nosuchpreset'], "unknown preset 'nosuchpreset'", 2),
    (['--config=configs/nosuchfile.py'], 'nosuchfile.py', 2),
    (['--config.data.name=nosuchdata'], "unknown data.name 'nosuchdata'", 1),
    (['--config.data.name=text', '--config.data.path=/no/such/path'], 'does not exist', 1),
    # Counts and sizes out of their range (config_lib.RANGES), before anything is prepared.
    (['--config.batch_size=0'], 'batch_size=0 (must be at least 1)', 2),
    (['--config.data.seq_len=0'], 'data.seq_len=0 (must be at least 1)', 2),
    (['--config.log_every=0'], 'log_every=0 (must be at least 1)', 2),
    (['--config.checkpoint_every=0'], 'checkpoint_every=0 (must be at least 1)', 2),
    (['--config.total_steps=0'], 'total_steps=0 (must be at least 1)', 2),
    (['--config.total_steps=-5'], 'total_steps=-5 (must be at least 1)', 2),
    (['--config.keep_checkpoints=0'], 'keep_checkpoints=0 (must be at least 1)', 2),
    (['--config.eval_steps=0'], 'eval_steps=0 (must be at least 1, or -1)', 2),
    (['--config.optimizer.lr=nan'], 'optimizer.lr=nan (must be at least 0)', 2),
])
def test_cli_rejects_bad_config(tmp_path, args, fragment, code):
  workdir = tmp_path / 'w'
  result = cli_in_process('--config=configs/lm.py:smoke', *args, f'--workdir={workdir}')
  assert_one_error_line(result, fragment, code)
  assert not workdir.exists()                 # no workdir left behind


def test_every_count_and_size_key_has_a_range():
  """One table (config_lib.RANGES) covers every numeric key; each range refuses the values
  just outside it, and takes the defaults and configs/lm.py's presets."""
  flat = dict(config_lib.flatten(config_lib.base_config().to_dict()))
  numeric = {k for k, v in flat.items() if isinstance(v, (int, float)) and
             not isinstance(v, bool)}
  assert numeric - set(config_lib.RANGES) - set(config_lib.UNBOUNDED) == set()
  for key, valid in config_lib.RANGES.items():
    outside = [valid.low if valid.low_open else valid.low - 1]
    if valid.high is not None:
      outside.append(valid.high if valid.high_open else valid.high + 1)
    for value in outside:
      assert value not in valid, (key, value)
      if key in flat:
        config = config_lib.base_config()
        *parents, last = key.split('.')
        node = config
        for part in parents:
          node = node[part]
        node[last] = type(flat[key])(value)
        with pytest.raises(ConfigError, match=re.escape(f'{key}=')):
          config_lib.validate(config)
  from configs import lm
  for preset in ('smoke', 'cpu', 'gpu', 'paper'):
    config_lib.validate(lm.get_config(preset))


def test_total_steps_at_or_below_the_workdirs_step(trained_workdir):
  before = tree_digest(trained_workdir)
  equal = cli_in_process(*TRAINED_ARGS, f'--config.total_steps={TRAINED_STEPS}',
                         f'--workdir={trained_workdir}')
  assert equal.returncode == 0, equal.stderr
  assert f'already at step {TRAINED_STEPS}' in equal.stdout
  lower = cli_in_process(*TRAINED_ARGS, '--config.total_steps=5', f'--workdir={trained_workdir}')
  assert_one_error_line(lower, f'is already at step {TRAINED_STEPS}, beyond total_steps=5', 1)
  assert tree_digest(trained_workdir) == before


def test_keys_added_since_a_workdir_was_written_resume_at_their_defaults():
  """A workdir written before a config key existed resumes if the key is at its default (the
  behaviour before it); at another value, or with a key the code no longer has, it is refused."""
  config = config_lib.base_config()
  saved = json.loads(config_lib.to_json(config))
  del saved['pipeline']['nesterov_momentum']
  assert config_lib.check_same_experiment(saved, config, 'w') == ['pipeline.nesterov_momentum']
  config.pipeline.nesterov_momentum = 0.9
  with pytest.raises(UserError, match=r'pipeline.nesterov_momentum: None -> 0.9'):
    config_lib.check_same_experiment(saved, config, 'w')
  config.pipeline.nesterov_momentum = 0.0
  saved['pipeline']['retired_key'] = 1
  with pytest.raises(UserError, match=r'pipeline.retired_key: 1 -> None'):
    config_lib.check_same_experiment(saved, config, 'w')


def test_other_experiment_and_workdir_without_checkpoints(trained_workdir, tmp_path):
  """A workdir of another experiment is refused; so is one whose checkpoints are gone
  (keep_checkpoints=0 used to delete them all, and the next run silently started over)."""
  before = tree_digest(trained_workdir)
  other = cli_in_process(*TRAINED_ARGS, '--config.model.d_model=64',
                         f'--workdir={trained_workdir}')
  assert_one_error_line(other, 'holds a different experiment (model.d_model: 32 -> 64)', 1)
  assert tree_digest(trained_workdir) == before
  workdir = copy_of(trained_workdir, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  gone = tree_digest(workdir)
  extended = cli_in_process(*TRAINED_ARGS, '--config.total_steps=20', f'--workdir={workdir}')
  assert_one_error_line(extended, 'holds config.json but no checkpoint to resume from', 1)
  assert tree_digest(workdir) == gone


# --- damaged files -------------------------------------------------------------------------

def _overwrite_files(step_dir):
  for folder, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(b'not a checkpoint')


def _truncate_data(step_dir):
  data = os.path.join(step_dir, 'default', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), 100)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def _checkpoints_a_file(step_dir):
  shutil.rmtree(os.path.dirname(step_dir))
  with open(os.path.dirname(step_dir), 'w') as f:
    f.write('x')


@pytest.mark.parametrize('damage,fragment', [
    (_overwrite_files, 'is damaged or incomplete: its data does not read back'),
    (_truncate_data, 'is damaged or incomplete: its data does not read back'),
    (_empty, 'is damaged or incomplete: its train state folder default/ is missing'),
    (lambda d: os.remove(os.path.join(d, 'default', '_METADATA')),
     "is damaged or incomplete: default/_METADATA, the state's structure, is missing"),
    (_checkpoints_a_file, 'checkpoints is a file, not a folder of checkpoints'),
])
def test_damaged_checkpoint_in_accels_words(trained_workdir, tmp_path, damage, fragment):
  workdir = copy_of(trained_workdir, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', str(TRAINED_STEPS)))
  damaged = tree_digest(workdir)
  result = cli_in_process(*TRAINED_ARGS, '--config.total_steps=20', f'--workdir={workdir}')
  assert_one_error_line(result, fragment, 1)
  assert 'orbax' not in result.stderr.lower() and 'Composite' not in result.stderr
  assert tree_digest(workdir) == damaged


def test_damaged_checkpoint_ends_the_process_with_one_line(trained_workdir, tmp_path):
  """As a process: no traceback of orbax's or TensorStore's threads after the line."""
  workdir = copy_of(trained_workdir, tmp_path)
  _truncate_data(os.path.join(workdir, 'checkpoints', str(TRAINED_STEPS)))
  damaged = tree_digest(workdir)
  result = run_cli(*TRAINED_ARGS, '--config.total_steps=20', f'--workdir={workdir}')
  assert_one_error_line(result, 'is damaged or incomplete', 1)
  assert result.stderr.strip().splitlines()[-1].startswith('error:'), result.stderr[-2000:]
  assert tree_digest(workdir) == damaged


def test_torn_or_damaged_metrics_line(trained_workdir, tmp_path, capsys):
  """A kill while a line is written leaves it torn: dropped on resume with a warning line.
  A damaged line before the last is an error, and nothing is rewritten (config.json
  included)."""
  workdir = copy_of(trained_workdir, tmp_path)
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, 'a') as f:
    f.write('{"step": 12, "train/lo')
  assert [line['step'] for line in read_jsonl(path)] == [5, 10]    # what summaries read
  checkpoint = snapshot(os.path.join(workdir, 'checkpoints'))
  resumed = cli_in_process(*TRAINED_ARGS, '--config.total_steps=15', f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  warnings = [l for l in resumed.stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and 'is torn' in warnings[0], resumed.stderr
  assert 'error:' not in resumed.stderr
  with open(path) as f:
    assert [json.loads(line)['step'] for line in f] == [5, 10, 15]
  assert_kept(checkpoint, os.path.join(workdir, 'checkpoints'))

  with open(path) as f:
    lines = f.readlines()
  with open(path, 'w') as f:
    f.writelines(['{"step": 5, "train/lo\n', *lines[1:]])
  damaged = tree_digest(workdir)
  refused = cli_in_process(*TRAINED_ARGS, '--config.total_steps=20', f'--workdir={workdir}')
  assert_one_error_line(refused, 'metrics.jsonl line 1 is not JSON', 1)
  assert tree_digest(workdir) == damaged


def test_symlinked_file_in_a_text_folder_is_read_once(tmp_path):
  folder = tmp_path / 'texts'
  folder.mkdir()
  (folder / 'a.txt').write_text('to be or not to be\n')
  (folder / 'b.txt').write_text('that is the question\n')
  (folder / 'link_to_a.txt').symlink_to(folder / 'a.txt')
  outside = tmp_path / 'outside.txt'
  outside.write_text('whether tis nobler\n')
  (folder / 'first_link_out.txt').symlink_to(outside)
  (folder / 'second_link_out.txt').symlink_to(outside)
  files = builders._user_text_files(str(folder))
  assert [p.name for p in files] == ['a.txt', 'b.txt', 'first_link_out.txt']


# --- runs that fail ------------------------------------------------------------------------

def _exploding_optimizer(monkeypatch):
  real = trainer.optim.build_optimizer

  def exploding(opt_cfg, total_steps, **kwargs):
    tx, schedule = real(opt_cfg, total_steps, **kwargs)

    def update(grads, state, params):   # same state as tx, so the checkpoint restores
      updates, state = tx.update(grads, state, params)
      return jax.tree.map(lambda u: u * 1e30, updates), state   # inf, then NaN
    return optax.GradientTransformation(tx.init, update), schedule
  monkeypatch.setattr(trainer.optim, 'build_optimizer', exploding)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(trained_workdir, tmp_path,
                                                              monkeypatch):
  workdir = copy_of(trained_workdir, tmp_path)
  before = tree_digest(os.path.join(workdir, 'checkpoints'))
  _exploding_optimizer(monkeypatch)
  with pytest.raises(train.TrainingDiverged, match='the last good checkpoint, step 10'):
    train.train_and_evaluate(smoke(total_steps=20, **{'optimizer.schedule': 'constant'}),
                             workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']
  assert tree_digest(os.path.join(workdir, 'checkpoints')) == before
  assert issubclass(train.TrainingDiverged, UserError)


def test_first_run_that_fails_leaves_nothing_that_blocks_the_rerun(tmp_path, monkeypatch):
  """NaN at step 2 of a new workdir (the warm-up's rate is 0 at step 0), after two logged
  lines: no config.json, so the corrected rerun (another learning rate) trains there, and
  the failed attempt's lines are replaced."""
  workdir = str(tmp_path / 'run')
  args = [*TRAINED_ARGS, '--config.total_steps=10', '--config.log_every=1',
          f'--workdir={workdir}']          # the same program as the test above: one compile
  _exploding_optimizer(monkeypatch)
  failed = cli_in_process(*args)
  assert_one_error_line(failed, 'at step 2; stopped (no checkpoint had been written)', 1)
  assert sorted(os.listdir(workdir)) == ['metrics.jsonl', 'tensorboard']
  monkeypatch.undo()
  rerun = cli_in_process(*args, '--config.optimizer.lr=3e-4')
  assert rerun.returncode == 0, rerun.stderr
  logged = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [line['step'] for line in logged] == list(range(1, 11))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optimizer']['lr'] == 3e-4


def test_out_of_device_memory(trained_workdir, tmp_path, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED in a step: one line with what to change; the checkpoint
  intact; a new workdir that fails so is not left behind."""
  real_get = programs_lib.Programs.get

  def get(self, plan_kwargs):
    real_get(self, plan_kwargs)

    def run(*args):
      raise jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 80.00GiB.')
    return run
  monkeypatch.setattr(programs_lib.Programs, 'get', get)
  workdir = copy_of(trained_workdir, tmp_path)
  before = tree_digest(workdir)
  resumed = cli_in_process(*TRAINED_ARGS, '--config.total_steps=20', f'--workdir={workdir}')
  assert_one_error_line(resumed, 'out of device memory (RESOURCE_EXHAUSTED: Out of memory '
                        'while trying to allocate 80.00GiB.); lower batch_size', 1)
  assert f'the checkpoint of step 10 in {workdir}/checkpoints is intact' in resumed.stderr
  assert tree_digest(workdir) == before
  fresh = tmp_path / 'fresh'
  failed = cli_in_process(*TRAINED_ARGS, f'--workdir={fresh}')
  assert_one_error_line(failed, 'out of device memory', 1)
  assert not fresh.exists()


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('mine')
  for workdir, fragment in ((path, f'--workdir {path} is a file, not a folder'),
                            (path / 'run', f'{path} is a file, not a folder')):
    result = cli_in_process(*TRAINED_ARGS, f'--workdir={workdir}')
    assert_one_error_line(result, fragment, 1)
  assert path.read_text() == 'mine'


def test_library_info_lines_are_silenced():
  """faults.quiet_logs (every entry point): jax's platform probe (no TPU here) and orbax's
  records do not reach the user; warnings from elsewhere do."""
  faults.quiet_logs()   # undone after the test (conftest.logging_restored)
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()

  def shown(name, level, pathname='x.py'):
    return handler.filter(logging.LogRecord(name, level, pathname, 1, 'm', None, None))
  assert not shown('jax._src.xla_bridge', logging.INFO)          # "Unable to initialize..."
  assert not shown('absl', logging.ERROR, f'{os.sep}site-packages{os.sep}orbax{os.sep}f.py')
  assert shown('accel', logging.WARNING)
  assert logging.getLogger('jax').getEffectiveLevel() == logging.WARNING


def test_reproduce_and_sweep_write_under_runs_by_default(tmp_path):
  """Nothing goes into the repository's results/ unless asked (`--out results/tables`):
  reproduce's tables and sweep's folder default to runs/, which git ignores."""
  from experiments import reproduce as reproduce_entry
  from absl import flags
  assert flags.FLAGS['out'].default == 'runs/tables'
  assert flags.FLAGS['runs_dir'].default == 'runs/reproduce'
  del reproduce_entry
  code = ('from experiments import sweep; from absl import flags; '
          'print(flags.FLAGS["sweep_dir"].default, sweep.default_sweep_dir("configs/lm.py:smoke"))')
  shown = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=120)
  assert shown.stdout.split() == ['None', 'runs/sweeps/lm-smoke'], shown.stderr
  if shutil.which('git') and os.path.isdir(os.path.join(ROOT, '.git')):
    for path in ('runs/tables/x.md', 'runs/sweeps/lm-smoke/summary.md'):   # -q: one path
      assert subprocess.run(['git', 'check-ignore', '-q', path], cwd=ROOT).returncode == 0, path


# --- processes: signals, a second run, read-only and full file systems -----------------------

def _logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return [line['step'] for line in read_jsonl(path)] if os.path.exists(path) else []


# Execs its arguments with SIGINT at its default (no preexec_fn: forking a threaded process).
_SIGINT_DEFAULT_EXEC = ('import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
                        'os.execv(sys.argv[1], sys.argv[1:])')


def _start(args, cache):
  """The CLI as a terminal starts it: SIGINT at its default even where pytest runs as a
  background job, whose children inherit SIGINT ignored (and then keep ignoring it)."""
  return subprocess.Popen([sys.executable, '-c', _SIGINT_DEFAULT_EXEC, *cli_command(*args)],
                          cwd=ROOT, env=cli_env(cache_env(cache)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_until_trained_past(proc, workdir, step, timeout=240):
  deadline = time.monotonic() + timeout
  while max(_logged_steps(workdir), default=0) <= step:
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, 'the run did not reach its loop in time'
    time.sleep(0.2)


def _interrupted(proc, signum):
  """Sends `signum`; (step it stopped at, stdout, stderr) after checking its one line."""
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
  assert 'Traceback' not in err and 'error:' not in err, err[-2000:]
  last = err.strip().splitlines()[-1]
  match = re.fullmatch(r'interrupted at step (\d+); run the same command to resume', last)
  assert match, err[-2000:]
  return int(match.group(1)), out, err


def test_ctrl_c_sigterm_second_run_and_stale_lock(trained_workdir, tmp_path, compile_cache_dir):
  """Ctrl-C (SIGINT) stops after the current step with a checkpoint of it, exit 130; the
  same command resumes from exactly that step (with or without the progress bar), here
  after a lock left by a dead process, and SIGTERM stops it again (143). A second run on
  the workdir while the first trains is refused with one line and changes nothing."""
  workdir = copy_of(trained_workdir, tmp_path)
  before = snapshot(workdir)
  args = [*TRAINED_ARGS, '--config.total_steps=100000', '--config.checkpoint_every=100000',
          f'--workdir={workdir}']
  first = _start([*args, '--config.progress_bar=True'], compile_cache_dir)
  _wait_until_trained_past(first, workdir, TRAINED_STEPS)
  with open(os.path.join(workdir, 'run.lock')) as f:
    lock = f.read()
  assert json.loads(lock)['pid'] == first.pid
  second = cli_in_process(*args)     # another process than `first`: refused at its lock
  assert_one_error_line(second, f'is in use by pid {first.pid} on host {socket.gethostname()}',
                        1)
  with open(os.path.join(workdir, 'run.lock')) as f:
    assert f.read() == lock

  stopped, out, _ = _interrupted(first, signal.SIGINT)
  assert f'resumed from step {TRAINED_STEPS}' in out
  assert stopped > TRAINED_STEPS
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert steps == [TRAINED_STEPS, stopped]            # the step reached, checkpointed
  assert not os.path.exists(os.path.join(workdir, 'run.lock'))
  del before['config.json']                          # rewritten (total_steps) once the
  assert_kept(before, workdir, appended=('metrics.jsonl',))   # run's checkpoint was complete
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['total_steps'] == 100000
  kept = snapshot(os.path.join(workdir, 'checkpoints'))

  with open(os.path.join(workdir, 'run.lock'), 'w') as f:   # as a killed run leaves it
    json.dump({'pid': first.pid, 'host': socket.gethostname(), 'started': 'earlier'}, f)
  again = _start(args, compile_cache_dir)
  _wait_until_trained_past(again, workdir, stopped)
  stopped_again, out, err = _interrupted(again, signal.SIGTERM)
  assert f'resumed from step {stopped}' in out
  assert f'warning: took over the lock of pid {first.pid}' in err
  assert stopped_again > stopped
  assert not os.path.exists(os.path.join(workdir, 'run.lock'))
  assert_kept(kept, os.path.join(workdir, 'checkpoints'))
  # Nothing lost, nothing twice: every 5th step logged once, up to the last stop.
  assert _logged_steps(workdir) == list(range(5, stopped_again + 1, 5))


def _mount_namespace(tmp_path):
  """`unshare` arguments for a private mount namespace where this user may mount (root: -m;
  others: -rm, a user namespace too), or None where neither works."""
  if not shutil.which('unshare'):
    return None
  probe = tmp_path / 'probe'
  probe.mkdir()
  for flag in ('-m', '-rm'):
    done = subprocess.run(['unshare', flag, 'sh', '-c', 'mount -t tmpfs tmpfs "$1"', 'sh',
                           str(probe)], capture_output=True, timeout=60)
    if done.returncode == 0:
      return ['unshare', flag]
  return None


NO_NAMESPACE = ('needs a private mount namespace (unshare -m as root, unshare -rm otherwise) '
                'to mount a read-only bind or a small tmpfs; chmod does not stop root')


def test_read_only_workdir(trained_workdir, tmp_path, compile_cache_dir):
  unshare = _mount_namespace(tmp_path)
  if unshare is None:
    pytest.skip(NO_NAMESPACE)
  workdir = copy_of(trained_workdir, tmp_path)
  before = tree_digest(workdir)
  script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
  result = subprocess.run(
      [*unshare, 'sh', '-c', script, 'sh', workdir,
       *cli_command(*TRAINED_ARGS, '--config.total_steps=20', f'--workdir={workdir}')],
      cwd=ROOT, env=cli_env(cache_env(compile_cache_dir)), capture_output=True, text=True,
      timeout=300)
  assert_one_error_line(result, f'cannot write {workdir}/run.lock (Read-only file system)', 1)
  assert tree_digest(workdir) == before


def test_disk_full_during_a_run(trained_workdir, tmp_path, compile_cache_dir):
  """The workdir on a tmpfs with room for the metrics but not for the next checkpoint:
  one line at the step whose checkpoint failed, checkpoint 10 and config.json as before."""
  unshare = _mount_namespace(tmp_path)
  if unshare is None:
    pytest.skip(NO_NAMESPACE)
  pages = sum(-(-len(data) // 4096) * 4096 + 4096 for data in snapshot(trained_workdir).values())
  mount, after = str(tmp_path / 'small'), str(tmp_path / 'after')
  os.mkdir(mount)
  workdir = os.path.join(mount, 'run')
  script = ('mount -t tmpfs -o size="$1" tmpfs "$2" && cp -a "$3" "$4" && shift 5 && '
            '"$@"; status=$?; cp -a "$WORKDIR" "$AFTER"; exit $status')
  result = subprocess.run(
      [*unshare, 'sh', '-c', script, 'sh', str(pages + 64 * 1024), mount, trained_workdir,
       workdir, '--',
       *cli_command(*TRAINED_ARGS, '--config.total_steps=30', f'--workdir={workdir}')],
      cwd=ROOT, env=cli_env({**cache_env(compile_cache_dir), 'WORKDIR': workdir,
                             'AFTER': after}),
      capture_output=True, text=True, timeout=300)
  assert_one_error_line(result, 'no space left on device', 1)
  assert ('stopped at step 20; the checkpoint of step 10 in '
          f'{workdir}/checkpoints is intact') in result.stderr
  assert_kept(snapshot(trained_workdir), after, appended=('metrics.jsonl',))
  assert not os.path.exists(os.path.join(after, 'checkpoints', '20'))
