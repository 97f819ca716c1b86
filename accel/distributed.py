"""Multi-process start-up: `jax.distributed.initialize` from the usual environment variables.

Set JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every
process (or run where jax detects the cluster itself: Cloud TPU, SLURM, ...). Must run before
anything touches a jax backend.
"""
from __future__ import annotations

import os

import jax


def initialize_from_env() -> None:
  if 'JAX_COORDINATOR_ADDRESS' not in os.environ:
    return
  jax.distributed.initialize(
      coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
      num_processes=int(os.environ['JAX_NUM_PROCESSES']),
      process_id=int(os.environ['JAX_PROCESS_ID']))
