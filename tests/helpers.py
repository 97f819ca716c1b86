"""Test utilities: run code in a subprocess with N simulated CPU devices, run the CLI."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, devices: int = 1, timeout: int = 300, env=None):
  """Runs `code` in a fresh interpreter with `devices` CPU devices; returns CompletedProcess."""
  full_env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
              'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **(env or {})}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def run_cli(*args, timeout: int = 300, env=None):
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **(env or {})}
  return subprocess.run([sys.executable, '-m', 'experiments.train', *args], cwd=ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)
