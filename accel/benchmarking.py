"""The one benchmark harness of `experiments/bench_*.py`: variants, timing, provenance, tables.

A benchmark is a dict of variants, each a compiled step and its state (`Variant`), timed
side by side in one process (`compare`) and written with the device, versions, date and
command that produced it (`provenance`, `write_results`). Train-step variants are built
through accel's own trainers (`trainer_variant`: the task and trainer `accel.train.build`
gives the loop), so a benchmark times the step users run.

Timing queues steps back to back and synchronizes once per round (synchronizing after every
call hides the device's throughput behind launch latency); variants run round-robin
(`interleaved_rounds`) so drift in the machine's load hits all alike, and the reported time
is the median over rounds with the max-min spread beside it.

A script's flags start from `flags()` (--out, --quick, --rounds, --steps); `scale_defaults`
fills the ones left unset from the script's --quick or full-scale sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp

from accel.programs import step_flops

__all__ = ['Variant', 'compare', 'compiled', 'flags', 'interleaved_rounds',
           'markdown_table', 'matmul_ceiling', 'provenance', 'provenance_line', 'ratios',
           'report', 'scale_defaults', 'temp_bytes', 'time_calls', 'timing_table',
           'trainer_variant', 'try_variants', 'write_results', 'git_commit']

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


# --- flags -------------------------------------------------------------------------------

def flags(out: str = 'results') -> argparse.ArgumentParser:
  """The flags every benchmark has, as an argparse parent:
  `argparse.ArgumentParser(parents=[benchmarking.flags()])`. --rounds and --steps default
  to None: `scale_defaults` gives them the script's sizes."""
  parent = argparse.ArgumentParser(add_help=False)
  parent.add_argument('--out', default=out,
                      help="folder of the results' .json and .md ('': print the table only)")
  parent.add_argument('--quick', action='store_true',
                      help='CPU scale: a tiny model, seconds (default: the GPU scale)')
  parent.add_argument('--rounds', type=int, default=None,
                      help='interleaved timing rounds (the median over them is reported)')
  parent.add_argument('--steps', type=int, default=None,
                      help='steps of each variant per round, queued, one synchronization')
  return parent


def scale_defaults(args: argparse.Namespace, quick: dict, full: dict) -> argparse.Namespace:
  """Sets every attribute of `args` that is None to its --quick (`quick`) or full-scale
  (`full`) value: a flag given on the command line wins over the scale."""
  for name, value in (quick if args.quick else full).items():
    if getattr(args, name, None) is None:
      setattr(args, name, value)
  return args


# --- provenance and output ---------------------------------------------------------------

def provenance() -> dict:
  """Device, versions, date and the exact command: what every results file records."""
  devices = jax.devices()
  try:
    import flax  # pylint: disable=g-import-not-at-top
    flax_version = flax.__version__
  except ImportError:
    flax_version = None
  commit = git_commit()
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable),
                                                   '-m', _module_name()] + sys.argv[1:]),
      'device': devices[0].device_kind, 'device_count': len(devices),
      'platform': devices[0].platform, 'jax': jax.__version__, 'flax': flax_version,
      'python': platform.python_version(), 'git_commit': commit,
  }


def git_commit() -> str | None:
  """The code's commit: $ACCEL_GIT_COMMIT where set (a tree that travels with a stale or no
  .git, e.g. to a device machine), else HEAD, with '+changes' when the tracked files differ
  from it (a result of uncommitted code says so)."""
  commit = os.environ.get('ACCEL_GIT_COMMIT')
  if commit:
    return commit
  git = lambda *args: subprocess.run(['git', *args], capture_output=True, text=True,
                                     check=False, timeout=30, cwd=ROOT).stdout.strip()
  try:
    head = git('rev-parse', '--short', 'HEAD')
    return (head + '+changes' if git('status', '--porcelain', '--untracked-files=no')
            else head) if head else None
  except (OSError, subprocess.TimeoutExpired):
    return None


def _module_name() -> str:
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  return spec.name if spec is not None else (sys.argv[0] if sys.argv else '?')


def provenance_line(meta: dict) -> str:
  """One Markdown paragraph of `provenance()`: where, with what, when, and the command."""
  return (f"Device: {meta['platform']}: {meta['device']} (x{meta['device_count']}), "
          f"jax {meta['jax']}, flax {meta['flax']}, python {meta['python']}, "
          f"commit {meta['git_commit']}, {meta['date']}. Command: `{meta['command']}`")


def markdown_table(header: list[str], rows: list[list[Any]], floats: str = '.3f') -> str:
  """A Markdown table; float cells formatted with `floats`, None as '-'."""
  def cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
      return '-'
    return format(value, floats) if isinstance(value, float) else str(value)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(cell(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


TIMING_COLUMNS = {'ms/step (median)': 'ms_per_step', 'max-min over rounds (ms)': 'ms_range',
                  'compile (s)': 'compile_s', 'warm-up (s)': 'warmup_s'}


def timing_table(rows: dict[str, dict], extra: dict[str, Callable[[dict], Any]] | None = None,
                 errors: dict[str, str] | None = None) -> str:
  """The Markdown table of `compare`'s rows: one line per variant, the timing columns and
  `extra` (header -> fn(row)); variants that failed to build (`try_variants`) say so."""
  extra = extra or {}
  header = ['variant', *TIMING_COLUMNS, *extra]
  lines = [[name, *(row[k] for k in TIMING_COLUMNS.values()), *(f(row) for f in extra.values())]
           for name, row in rows.items()]
  lines += [[name, f'failed: {error}', *[None] * (len(header) - 2)]
            for name, error in (errors or {}).items()]
  return markdown_table(header, lines)


def ratios(rows: dict[str, dict], pairs: list[tuple[str, str]],
           key: str = 'ms_per_step') -> dict[str, float]:
  """{'a/b': rows[a][key] / rows[b][key]} for the pairs whose variants both ran."""
  return {f'{a}/{b}': rows[a][key] / rows[b][key] for a, b in pairs if a in rows and b in rows}


def report(title: str, setup: str, meta: dict, table: str,
           ratio_values: dict[str, float] | None = None) -> str:
  """A results file's Markdown: title, the setup sentence, provenance, the table, ratios."""
  lines = [f'# {title}', '', setup, '', provenance_line(meta), '', table]
  if ratio_values:
    lines += [markdown_table(['ratio', 'value'], [[k, v] for k, v in ratio_values.items()])]
  return '\n'.join(lines)


def write_results(out_dir: str, name: str, payload: dict, markdown: str) -> None:
  """OUT_DIR/NAME.json and OUT_DIR/NAME.md, and the Markdown printed; only printed if
  `out_dir` is ''."""
  print(markdown)
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(payload, f, indent=2, default=str)
  with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
    f.write(markdown)


# --- compiling and timing ----------------------------------------------------------------

def compiled(jitted, *args, compiler_options: dict | None = None
             ) -> tuple[Any, float, float]:
  """(jitted lowered and compiled for `args`, seconds it took, its FLOPs per
  `programs.step_flops`). compiler_options: XLA options for this program alone (e.g.
  {'xla_gpu_enable_latency_hiding_scheduler': True}, the XLA_FLAGS names without '--'), so
  variants under other flags share one process."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  program = lowered.compile(compiler_options=compiler_options)
  seconds = time.perf_counter() - start
  return program, seconds, step_flops(lowered, program)


def temp_bytes(program) -> float:
  """The compiled program's temporary memory (XLA memory analysis: activations kept for the
  backward, workspace); NaN where the backend gives none."""
  analysis = program.memory_analysis()
  return float(getattr(analysis, 'temp_size_in_bytes', math.nan)) if analysis else math.nan


@dataclasses.dataclass
class Variant:
  """One side of a comparison: `step(state) -> (state, out)`, already compiled, from
  `state`. What the harness learnt compiling it rides along."""
  step: Callable[[Any], tuple[Any, Any]]
  state: Any
  compile_s: float = math.nan
  flops: float = math.nan          # per step, `programs.step_flops`
  temp_bytes: float = math.nan
  program: Any = None              # the compiled step (its text: program.as_text())
  task: Any = None                 # trainer variants: what accel.train.build gave
  trainer: Any = None
  batch: Any = None


def trainer_variant(config, info, batch: dict, devices=None, plan_step: int = 0,
                    compiler_options: dict | None = None) -> Variant:
  """The train step `config` trains with, compiled for `batch`, as a `Variant`.

  Built as the loop builds it: `accel.train.build(config, info, devices)` gives the task
  and trainer; the state is `trainer.init`'s; the step is `trainer.train_step(state, batch,
  plan_kwargs)` with plan_kwargs = `task.methods.plan(plan_step).model_kwargs`, the arrays
  the enabled methods decide on the host. devices: default the first device (one-device
  step time); `batch`: host arrays of one global batch; compiler_options as `compiled`'s.
  """
  from accel import train  # pylint: disable=g-import-not-at-top  (train imports the world)
  devices = jax.devices()[:1] if devices is None else devices
  task, trainer = train.build(config, info, devices)
  batch = jax.device_put(batch, trainer.batch_sharding)
  state = trainer.init(jax.random.fold_in(jax.random.key(config.seed), 0), batch)
  plan = jax.device_put(task.methods.plan(plan_step).model_kwargs, trainer.replicated)
  program, seconds, flops = compiled(trainer.train_step, state, batch, plan,
                              compiler_options=compiler_options)
  return Variant(step=lambda s: program(s, batch, plan), state=state, compile_s=seconds,
                 flops=flops, temp_bytes=temp_bytes(program), program=program,
                 task=task, trainer=trainer, batch=batch)


def try_variants(builders: dict[str, Callable[[], Variant]]) -> tuple[dict, dict]:
  """Builds each variant; one that fails is reported (name -> 'Type: message') and the
  others are still measured. Returns (variants, errors)."""
  variants, errors = {}, {}
  for name, build in builders.items():
    try:
      variants[name] = build()
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      errors[name] = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:200]}'
  return variants, errors


def time_calls(fn: Callable, args_fn: Callable[[], tuple], iters: int, warmup: int = 2) -> float:
  """Median-free steady-state seconds per call: `iters` queued calls, one synchronization.

  `args_fn()` gives the arguments of the next call (so donated buffers are renewed); `fn`
  returns its new state as the first output when the call is a step.
  """
  out = None
  for _ in range(warmup):
    out = fn(*args_fn())
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args_fn())
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def interleaved_rounds(steps: dict, states: dict, args: tuple, rounds: int,
                       steps_per_round: int) -> tuple[dict, dict]:
  """Times variants round-robin so drift hits all alike.

  `steps[v](state, *args) -> (state, out)`; each round runs `steps_per_round` queued steps of
  every variant and synchronizes once. Returns (median ms/step, max-min ms/step over rounds)
  per variant; `states` is updated in place.
  """
  times = {v: [] for v in steps}
  for _ in range(rounds):
    for v, step in steps.items():
      state, out = states[v], None
      start = time.perf_counter()
      for _ in range(steps_per_round):
        state, out = step(state, *args)
      jax.block_until_ready(out)
      times[v].append((time.perf_counter() - start) / steps_per_round)
      states[v] = state
  median = {v: 1e3 * statistics.median(t) for v, t in times.items()}
  spread = {v: 1e3 * (max(t) - min(t)) for v, t in times.items()}
  return median, spread


def compare(variants: dict[str, Variant], rounds: int, steps_per_round: int,
            warmup: int = 2) -> dict[str, dict]:
  """Warms every variant up (`warmup` steps), then times them in interleaved rounds.

  Returns, per variant: ms_per_step (median over rounds), ms_range (max - min over rounds),
  compile_s, warmup_s, flops_per_step (XLA cost analysis), temp_mib (XLA memory analysis).
  The variants' states advance in place.
  """
  warmup_s = {}
  for name, variant in variants.items():
    start, out = time.perf_counter(), None
    for _ in range(warmup):
      variant.state, out = variant.step(variant.state)
    jax.block_until_ready(out)
    warmup_s[name] = time.perf_counter() - start
  states = {name: v.state for name, v in variants.items()}
  ms, spread = interleaved_rounds({name: v.step for name, v in variants.items()}, states, (),
                                  rounds, steps_per_round)
  rows = {}
  for name, variant in variants.items():
    variant.state = states[name]
    rows[name] = {'ms_per_step': ms[name], 'ms_range': spread[name],
                  'compile_s': variant.compile_s, 'warmup_s': warmup_s[name],
                  'flops_per_step': variant.flops, 'temp_mib': variant.temp_bytes / 2 ** 20}
  return rows


def matmul_ceiling(n: int, dtype=jnp.bfloat16, iters: int = 20,
                   precision=None) -> dict:
  """Achieved FLOP/s of an n^3 matmul chain: the device's practical dense-math ceiling."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), dtype)
  b = jax.random.normal(key_b, (n, n), dtype)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
  seconds = time_calls(matmul, lambda: (a, b), iters)
  return {'n': n, 'dtype': jnp.dtype(dtype).name, 'seconds': seconds,
          'flops_per_s': 2 * n ** 3 / seconds}


# --- variants in other processes ---------------------------------------------------------

class ProcessVariant:
  """A variant timed in a child process, in the same interleaved rounds as the in-process
  ones (`compare_with_processes`): what cannot share a process — other XLA flags
  (XLA_FLAGS is read once per process) or another framework (the PyTorch bar).

  The child runs `serve`: it builds, compiles and warms up its step, prints one line
  'ready {json}', then answers each line 'run N' on its stdin with 'seconds S' (N steps
  queued, one synchronization, S seconds per step), any other command of its own with
  'COMMAND {json}', and 'exit' by leaving. Its stderr goes to `log_path`.
  """

  def __init__(self, argv: list[str], env: dict | None = None, log_path: str = os.devnull):
    self.argv, self.log_path = argv, log_path
    self._log = open(log_path, 'w')  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._log, text=True, env=env, bufsize=1)
    self._lines: queue.Queue = queue.Queue()   # stdout lines, '' at its end
    threading.Thread(target=self._pump, daemon=True).start()
    self.info: dict = {}

  def _pump(self) -> None:
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put('')

  def wait_ready(self, timeout_s: float) -> dict:
    """The child's 'ready' information, once it has compiled and warmed up."""
    self.info = json.loads(self._read('ready', timeout_s))
    return self.info

  def request(self, command: str, timeout_s: float = 600.0) -> Any:
    self._send(command)
    return json.loads(self._read(command.split()[0], timeout_s))

  def run(self, steps: int) -> float:
    """Seconds per step of `steps` queued steps in the child."""
    self._send(f'run {steps}')
    return json.loads(self._read('seconds', 600.0))

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self._send('exit')
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    self._log.close()

  def _send(self, line: str) -> None:
    self.proc.stdin.write(line + '\n')
    self.proc.stdin.flush()

  def _read(self, tag: str, timeout_s: float) -> str:
    """The rest of the child's next stdout line that starts with `tag` (other lines, stray
    prints, are skipped); RuntimeError with its log's last line if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        line = self._lines.get(timeout=max(deadline - time.monotonic(), 0))
      except queue.Empty:
        line = None
      if line is None or line == '':
        if line is None:
          self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f'{os.path.basename(self.argv[-1])}: '
                           f'{"timed out" if line is None else "exited"} '
                           f'(rc {self.proc.returncode}): {self._last_log_line()}')
      if line.startswith(tag + ' '):
        return line[len(tag) + 1:].strip()

  def _last_log_line(self) -> str:
    self._log.flush()
    try:
      with open(self.log_path) as f:
        lines = [l.strip() for l in f if l.strip()]
    except OSError:
      lines = []
    return lines[-1][:300] if lines else 'no output'


def serve(run_steps: Callable[[int], float], info: dict,
          commands: dict[str, Callable[..., Any]] | None = None) -> None:
  """The child's side of `ProcessVariant`: prints 'ready {info}', then serves its stdin.
  run_steps(n): seconds per step of n queued steps (one synchronization at the end)."""
  print('ready ' + json.dumps(info, default=str), flush=True)
  for line in sys.stdin:
    command, *arguments = line.split()
    if command == 'exit':
      return
    if command == 'run':
      print(f'seconds {json.dumps(run_steps(int(arguments[0])))}', flush=True)
    elif commands and command in commands:
      print(f'{command} {json.dumps(commands[command](*arguments), default=str)}', flush=True)
    else:
      print(f'{command} {json.dumps({"error": "unknown command"})}', flush=True)


def step_runner(variant: Variant) -> Callable[[int], float]:
  """run_steps(n) of an in-process variant: n queued steps, one synchronization."""
  def run_steps(n: int) -> float:
    start, out = time.perf_counter(), None
    for _ in range(n):
      variant.state, out = variant.step(variant.state)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n
  return run_steps


def compare_with_processes(variants: dict[str, Variant],
                           processes: dict[str, ProcessVariant], rounds: int,
                           steps_per_round: int, warmup: int = 2) -> tuple[dict, dict]:
  """`compare`, with variants in child processes (already 'ready', warmed up there) timed
  in the same rounds: each round runs `steps_per_round` steps of every variant, in-process
  ones first, then each process's. A process that fails is dropped from the later rounds.
  Returns (rows as `compare`'s, errors: name -> message)."""
  warmup_s = {}
  for name, variant in variants.items():
    start = time.perf_counter()
    step_runner(variant)(warmup)
    warmup_s[name] = time.perf_counter() - start
  runners = {name: step_runner(v) for name, v in variants.items()}
  runners.update({name: p.run for name, p in processes.items()})
  times, errors = {name: [] for name in runners}, {}
  for _ in range(rounds):
    for name, run_steps in runners.items():
      if name in errors:
        continue
      try:
        times[name].append(run_steps(steps_per_round))
      except RuntimeError as e:
        errors[name] = str(e)[:300]
  rows = {}
  for name, t in times.items():
    if name in errors or not t:
      continue
    ms = [1e3 * s for s in t]
    row = {'ms_per_step': statistics.median(ms), 'ms_range': max(ms) - min(ms)}
    if name in variants:
      v = variants[name]
      row.update(compile_s=v.compile_s, warmup_s=warmup_s[name], flops_per_step=v.flops,
                 temp_mib=v.temp_bytes / 2 ** 20)
    else:
      info = processes[name].info
      row.update(compile_s=info.get('compile_s', math.nan),
                 warmup_s=info.get('warmup_s', math.nan),
                 flops_per_step=info.get('flops', math.nan),
                 temp_mib=info.get('temp_bytes', math.nan) / 2 ** 20)
    rows[name] = row
  return rows, errors
