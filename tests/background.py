"""Slow subprocesses of the tests, started as soon as the tests are collected and run one
after another beside them: CI has two cores and the pytest process keeps one busy.

A test module declares `background_jobs()`: {test function name: Job}. conftest queues the
jobs of the selected tests once collection is done (`start`); a test takes its job's
CompletedProcess with `result(name)`, which waits for it (or runs it then, if no queue was
started, e.g. under another runner). A job's files go in `folder(name)`, removed at the end
of the session.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading

_BASE: list[str] = []   # made on first use


@dataclasses.dataclass
class Job:
  args: list[str]
  env: dict
  cwd: str
  timeout: float
  result: subprocess.CompletedProcess | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  process: subprocess.Popen | None = None

  def run(self) -> None:
    try:
      self.process = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      try:
        out, err = self.process.communicate(timeout=self.timeout)
      except subprocess.TimeoutExpired:
        self.process.kill()
        out, err = self.process.communicate()
        err += f'\n(killed after {self.timeout} s)'
      self.result = subprocess.CompletedProcess(self.args, self.process.returncode, out, err)
    finally:
      self.done.set()


_JOBS: dict[str, Job] = {}
_stopped = threading.Event()


def folder(name: str) -> str:
  """A folder for job `name`'s files (made now, removed at the end of the session)."""
  if not _BASE:
    _BASE.append(tempfile.mkdtemp(prefix='accel_tests_'))
  path = os.path.join(_BASE[0], name)
  os.makedirs(path, exist_ok=True)
  return path


def start(jobs: dict[str, Job]) -> None:
  """Runs `jobs` one after another in a thread of this process."""
  jobs = {name: job for name, job in jobs.items() if name not in _JOBS}
  _JOBS.update(jobs)

  def run_all():
    for job in jobs.values():
      if _stopped.is_set():
        job.done.set()
      else:
        job.run()
  threading.Thread(target=run_all, daemon=True).start()


def result(name: str, job_of=None) -> subprocess.CompletedProcess:
  """Job `name`'s CompletedProcess, waiting for it; run here if no queue holds it
  (`job_of()` builds it then)."""
  if name not in _JOBS:
    _JOBS[name] = job_of()
    _JOBS[name].run()
  _JOBS[name].done.wait()
  return _JOBS[name].result


def stop() -> None:
  """Kills what still runs and removes the jobs' folders (end of the session)."""
  _stopped.set()
  for job in _JOBS.values():
    if job.process is not None and job.process.poll() is None:
      job.process.kill()
  for base in _BASE:
    shutil.rmtree(base, ignore_errors=True)
