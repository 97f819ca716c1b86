"""The keys every experiment config has, and the checks on a resolved config.

Config files in `configs/` start from `base_config()` and set what their experiment needs;
`experiments/train.py` locks the result, so an unknown key or a wrong type on the command
line is an error before anything runs.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import ml_collections

from accel.errors import ConfigError, UserError

# Keys whose change does not make a workdir a different experiment: a run may be resumed
# (and extended) with new values for them.
RESUMABLE_KEYS = ('total_steps', 'eval_every', 'eval_steps', 'checkpoint_every',
                  'log_every', 'keep_checkpoints', 'progress_bar', 'compilation_cache')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32
  c.eval_batch_size = 0          # 0: batch_size
  c.eval_every = 200
  c.eval_steps = 20              # batches per evaluation; -1: the whole validation split
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.train_accuracy = True        # LM tasks: top-1 accuracy in the train step's metrics too
                                 # (an argmax over the logits; evaluation always has it)
  c.compilation_cache = ''       # JAX's persistent compilation cache: '' -> <data dir>/
                                 # jax_compilation_cache, 'off', or a folder (accel.programs)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'shakespeare'
  c.data.path = ''               # data.name=text: a UTF-8 file or a folder of them
  c.data.dir = ''                # prepared datasets; '' -> $ACCEL_DATA_DIR or ~/.cache/accel
  c.data.seq_len = 256
  c.data.tokenizer = ''          # '' | 'bytes' (the corpus's own units) | 'bpe' | 'wordpiece'
                                 # | 'words': trained on train (accel/data/tokenization.py)
  c.data.vocab_size = 0          # the trained tokenizer's vocabulary size
  c.data.tokenizer_corpus = ''   # GLUE with a trained tokenizer: the pretraining corpus
  c.data.order = 'shuffled'      # 'shuffled' windows | 'contiguous' streams (row b of step t+1
                                 # continues row b of step t; segment-recurrent models)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'transformer_lm'
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.d_ff = 1024
  c.model.dropout_rate = 0.0
  c.model.pre_ln = True
  c.model.dtype = 'float32'
  c.model.scan_layers = False    # slower on GPU (accel/models/transformer.py says by how much)
  c.model.remat = False
  c.model.remat_policy = ''      # remat: what is saved, '' (nothing) | 'dots' | 'dots_no_batch'
  c.model.use_bias = True        # Dense and LayerNorm biases of the Transformer (nanoGPT's bias)
  c.model.qkv_projection = 'fused'   # 'fused' (one D x 3D Dense) | 'split' (query/key/value)
  c.model.gelu_recompute = False     # the MLP's backward recomputes bias add + GELU (no tanh kept)
  c.model.position_lookup = 'broadcast'   # 'broadcast' P[:L] | 'gather' P[positions]
  c.model.attention_impl = ''    # '' (XLA picks) | 'xla' | 'cudnn'
  # image classifiers (model.name cnn | mlp | resnet, accel/models/cnn.py)
  c.model.norm = 'none'          # 'none' | 'batch' | 'group' | 'layer'
  c.model.num_groups = 8         # norm=group: gcd(num_groups, channels) groups
  c.model.depth = 20             # resnet: 6n + 2
  c.model.width = 1              # resnet: channel multiplier

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.momentum = 0.0
  c.optimizer.nesterov = False
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_fraction = 0.1
  c.optimizer.decay_steps = 1000   # exponential schedule only
  c.optimizer.decay_rate = 0.99    # exponential schedule only
  c.optimizer.clip_norm = 1.0      # 0: no clipping
  c.optimizer.adam_lr = 0.0        # muon: Adam's lr on the non-matrix params (0: lr)
  c.optimizer.muon_beta = 0.95     # muon: its momentum

  c.layerdrop = ml_collections.ConfigDict()
  c.layerdrop.enabled = False
  c.layerdrop.theta_bar = 0.5
  c.layerdrop.gamma = 0.001

  c.stdloss = ml_collections.ConfigDict()   # accel/stdloss.py
  c.stdloss.enabled = False
  c.stdloss.weight = 1.0         # lambda
  c.stdloss.layers = ''          # regex on module paths; '' = every Dense/Conv
  c.stdloss.exclude = 'logits$'  # regex; '' = none
  c.stdloss.moments = 'global'   # 'global' | 'per_device'
  c.stdloss.layer_metrics = False  # also mean |mu| and sigma^2 of every layer, every step

  c.lowprec = ml_collections.ConfigDict()   # accel/lowprec/method.py
  c.lowprec.enabled = False
  for gemm in ('fwd', 'bwd_data', 'bwd_weight'):   # the three GEMMs of every Dense/Conv
    c.lowprec[gemm] = ml_collections.ConfigDict(dict(
        operand_fmt='e5m2', acc_fmt='e6m9', mul_fmt='fp32', chunk_size=64,
        mode='fast',               # 'exact' (every addition rounded) | 'fast' (per chunk)
        rounding='nearest',
        impl='jax'))               # 'jax' | 'pallas' (GPU kernels, accel/lowprec/kernel.py) |
                                   # 'auto' (pallas on a GPU where the kernels apply, else jax)
  c.lowprec.exempt_first_last = True
  c.lowprec.update_fmt = 'e6m9'  # weights, gradients, optimizer state; 'fp32': plain update
  c.lowprec.update_rounding = 'stochastic'
  c.lowprec.loss_scale = 1.0
  c.lowprec.seed = 0

  c.pipeline = ml_collections.ConfigDict()   # accel/pipeline (Ouroboros)
  c.pipeline.enabled = False
  c.pipeline.num_modules = 2                 # K
  c.pipeline.tied_ring = True                # K modules on K-1 stages; False: K on K
  c.pipeline.backward_weights = 'recompute'  # 'recompute' (Features Replay) | 'stored' (DDG)
  c.pipeline.weight_prediction = 0.0         # s > 0 ('stored'): accel/pipeline/prediction.py
  # Remedies for the stale gradients (accel/pipeline/remedies.py), each 0 = off:
  c.pipeline.sync_warmup_steps = 0           # N: iterations t < N synchronous
  c.pipeline.delay_compensation = 0.0        # DC-ASGD's lambda ('stored')
  c.pipeline.pipemare_steps = 0              # T: PipeMare's lr rescheduling length
  c.pipeline.error_feedback = 0.0            # c: the error-feedback correction
  c.pipeline.nesterov_momentum = 0.0         # gamma in [0, 1): Nesterov look-ahead ('stored')
  return c


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= value <= high (< high when high_open, > low when low_open); `also`: values
  outside it that mean something (-1: all)."""
  low: float
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  also: tuple = ()

  def __contains__(self, value) -> bool:
    if value in self.also:
      return True
    if isinstance(value, float) and not math.isfinite(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = (self.high is None or
             (value < self.high if self.high_open else value <= self.high))
    return above and below

  def __str__(self) -> str:
    if self.high is None:
      text = f'{"above" if self.low_open else "at least"} {self.low:g}'
    else:
      text = (f'in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}'
              f'{")" if self.high_open else "]"}')
    return text + ''.join(f', or {a:g}' for a in self.also)


# The valid range of every count, size and rate key (checked by `validate` before anything
# is prepared or compiled; a key a config does not have is skipped). The meaning of each
# key is beside it in base_config.
RANGES = {
    'total_steps': Range(1),
    'batch_size': Range(1),
    'eval_batch_size': Range(0),
    'eval_every': Range(1),
    'eval_steps': Range(1, also=(-1,)),
    'log_every': Range(1),
    'checkpoint_every': Range(1),
    'keep_checkpoints': Range(1),    # a run resumes from its last checkpoint
    'data.seq_len': Range(1),
    'data.vocab_size': Range(0),
    'model.num_layers': Range(1),
    'model.d_model': Range(1),
    'model.num_heads': Range(1),
    'model.d_ff': Range(1),
    'model.dropout_rate': Range(0, 1, high_open=True),
    'model.num_groups': Range(1),
    'model.depth': Range(1),
    'model.width': Range(1),
    'model.mem_len': Range(0),
    'optimizer.lr': Range(0),
    'optimizer.b1': Range(0, 1, high_open=True),
    'optimizer.b2': Range(0, 1, high_open=True),
    'optimizer.eps': Range(0),
    'optimizer.weight_decay': Range(0),
    'optimizer.momentum': Range(0, 1, high_open=True),
    'optimizer.warmup_steps': Range(0),
    'optimizer.end_lr_fraction': Range(0, 1),
    'optimizer.decay_steps': Range(1),
    'optimizer.decay_rate': Range(0, low_open=True),
    'optimizer.clip_norm': Range(0),
    'optimizer.adam_lr': Range(0),
    'optimizer.muon_beta': Range(0, 1, high_open=True),
    'layerdrop.theta_bar': Range(0, 1),
    'layerdrop.gamma': Range(0),
    'stdloss.weight': Range(0),
    'lowprec.fwd.chunk_size': Range(1),
    'lowprec.bwd_data.chunk_size': Range(1),
    'lowprec.bwd_weight.chunk_size': Range(1),
    'lowprec.loss_scale': Range(0, low_open=True),
    'pipeline.num_modules': Range(2),
    'pipeline.weight_prediction': Range(0),
    'pipeline.sync_warmup_steps': Range(0),
    'pipeline.delay_compensation': Range(0),
    'pipeline.pipemare_steps': Range(0),
    'pipeline.error_feedback': Range(0),
    'pipeline.nesterov_momentum': Range(0, 1, high_open=True),
}
UNBOUNDED = ('seed', 'lowprec.seed')   # numeric keys where any integer is a valid value


def load_file(path: str):
  """The module of the config file PATH, imported by path (experiments.train, sweep and
  reproduce read get_config / get_sweep from it)."""
  if not os.path.exists(path):
    raise UserError(f'config file {path} does not exist')
  spec = importlib.util.spec_from_file_location('_accel_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def validate(config) -> None:
  """Raises ConfigError naming every key of RANGES whose value is outside its range."""
  values = dict(flatten(config.to_dict()))
  bad = [f'{key}={values[key]!r} (must be {valid})' for key, valid in RANGES.items()
         if key in values and values[key] not in valid]
  if bad:
    raise ConfigError(f'{"; ".join(bad)}; nothing was run')


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def flatten(d, prefix=''):
  """('a.b.c', value) for every leaf of the nested dict `d` (ConfigDict.to_dict())."""
  for k, v in d.items():
    if isinstance(v, dict):
      yield from flatten(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def check_same_experiment(saved: dict, config, workdir: str) -> list[str]:
  """Raises UserError if `workdir`'s saved config differs outside RESUMABLE_KEYS.

  A key the saved config lacks (added to accel since the workdir was written) counts as the
  same when its value is base_config()'s default: new keys default to the behaviour that
  was there before them. Returns those keys, for the caller to log.
  """
  old, new = dict(flatten(saved)), dict(flatten(json.loads(to_json(config))))
  defaults = dict(flatten(json.loads(to_json(base_config()))))
  added = sorted(k for k in set(new) - set(old) if k in defaults and new[k] == defaults[k])
  diffs = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}'
           for k in sorted(set(old) | set(new))
           if k not in RESUMABLE_KEYS and k not in added and old.get(k) != new.get(k)]
  if diffs:
    raise UserError(f'workdir {workdir} holds a different experiment ({"; ".join(diffs[:3])}'
                    f'{"; ..." if len(diffs) > 3 else ""}); use a new --workdir')
  return added
