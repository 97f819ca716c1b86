"""The variants the pipeline benchmarks run: the same config, devices, batch and params.

  'one device', 'data parallel'   the spine's data-parallel step (`accel.train.build`) on
                                  one device / all of them (its blocks unrolled: the layout
                                  it runs fastest); Transformer-XL with its memory carried
                                  in the state (sharded with the rows), as segment
                                  training does
  'GPipe M=m'                     `baselines.gpipe` over ('data'=1, 'stage'=n) (TransformerLM)
  'Ouroboros K=k untied|tied ring stored|recompute[ pred s][ data d]'
                                  the spine's pipeline trainer (`accel.pipeline.trainer`):
                                  config.pipeline with those settings, on d x S devices
A `Variant` starts from the shared params (the model's), steps on a batch dict(inputs,
targets) [B, L] and gives the model's params back, so a benchmark can time, train or
evaluate every variant the same way.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax

from accel import optim, train
from accel.data.input_pipeline import DatasetInfo
from accel.pipeline import baselines, families
from accel.pipeline.layout import Layout
from accel.pipeline.spmd import make_mesh


@dataclasses.dataclass
class Variant:
  init: Callable[[], Any]                        # () -> state, from the shared params
  step: Callable[[Any, dict], tuple[Any, Any]]   # (state, batch) -> (state, loss)
  to_model: Callable[[Any], Any]                 # state -> the model's params
  lower: Callable[[Any, dict], Any]              # (state, batch) -> the lowered step
  devices: int


def info(config) -> DatasetInfo:
  """The benchmarks' data: language-model tokens of config.data.vocab_size ids."""
  return DatasetInfo(kind='lm', vocab_size=config.data.vocab_size)


def model_pieces(config):
  """The model of `config` as the pipeline cuts it (`families`; scan layout)."""
  return families.for_config(_task(config).model.cfg)


def init_params(config):
  """The shared initial params (seed config.seed)."""
  mp = model_pieces(config)
  return jax.jit(mp.init_params)(jax.random.key(config.seed),
                                 jax.numpy.zeros((1, config.data.seq_len), jax.numpy.int32))


def ouroboros_name(k: int, tied: bool, backward: str, prediction: float = 0.0,
                   data: int = 1) -> str:
  return (f'Ouroboros K={k} {"tied ring" if tied else "untied"} {backward}'
          f'{f" pred {prediction:g}" if prediction else ""}{f" data {data}" if data > 1 else ""}')


def names(num_devices: int, micro: int, prediction: float = 0.0, data: int = 1,
          gpipe: bool = True) -> list[str]:
  """One device, data parallel, GPipe M=micro (gpipe), and the Ouroboros variants on a
  data x stage mesh of num_devices: K = S untied and K = S+1 on a tied ring, 'recompute'
  and 'stored' (and 'stored' with weight prediction if prediction > 0)."""
  stages = num_devices // data
  out = ['one device', 'data parallel'] + ([f'GPipe M={micro}'] if gpipe else [])
  for k, tied in ((stages, False), (stages + 1, True)):
    out += [ouroboros_name(k, tied, 'recompute', data=data),
            ouroboros_name(k, tied, 'stored', data=data)]
    if prediction:
      out.append(ouroboros_name(k, tied, 'stored', prediction, data))
  return out


_OUROBOROS = re.compile(r'Ouroboros K=(\d+) (untied|tied ring) (stored|recompute)'
                        r'(?: pred ([\d.e-]+))?(?: data (\d+))?$')


def build(name: str, config, params, devices) -> Variant:
  """The variant `name` (module docstring) of `config` on `devices`, from `params`."""
  if name in ('one device', 'data parallel'):
    return _spine(_with(config, pipeline={'enabled': False}), params,
                  devices[:1] if name == 'one device' else devices)
  if name.startswith('GPipe M='):
    return _gpipe(config, params, devices, int(name.split('=')[1]))
  m = _OUROBOROS.match(name)
  if not m:
    raise ValueError(f'unknown variant {name!r}')
  k, tied, backward = int(m.group(1)), m.group(2) == 'tied ring', m.group(3)
  data = int(m.group(5) or 1)
  stages = Layout(config.model.num_layers, k, tied).num_stages
  variant = _with(config, pipeline=dict(enabled=True, num_modules=k, tied_ring=tied,
                                        backward_weights=backward,
                                        weight_prediction=float(m.group(4) or 0.0)))
  return _spine(variant, params, devices[:data * stages])


def _with(config, **blocks):
  config = config.copy_and_resolve_references()
  for block, values in blocks.items():
    config[block].update(values)
  return config


def _task(config):
  task, _ = train.build(_with(config, pipeline={'enabled': False}), info(config),
                        jax.devices()[:1])
  return task


def _spine(config, params, devices) -> Variant:
  """A trainer of `accel.train.build`: the data-parallel step or the pipeline's."""
  _, trainer = train.build(config, info(config), devices)
  put = lambda batch: jax.device_put(batch, trainer.batch_sharding)
  first = {'inputs': jax.numpy.zeros((config.batch_size, config.data.seq_len), 'int32')}
  first['targets'] = first['inputs']

  def step(state, batch):
    state, metrics = trainer.train_step(state, put(batch), {})
    return state, metrics['loss']

  return Variant(init=lambda: trainer.init(jax.random.key(config.seed), put(first), params),
                 step=step, to_model=trainer.model_params,
                 lower=lambda state, batch: trainer.train_step.lower(state, put(batch), {}),
                 devices=len(devices))


def _gpipe(config, params, devices, micro: int) -> Variant:
  task = _task(config)
  tx, _ = optim.build_optimizer(config.optimizer, config.total_steps)
  gp = baselines.gpipe(task.model.cfg, tx, make_mesh(1, len(devices), devices), micro)

  def step(state, batch):
    *state, loss = gp.run(*state, batch)
    return tuple(state), loss

  return Variant(init=lambda: gp.init(params), step=step,
                 to_model=lambda state: gp.to_model(state[0]),
                 lower=lambda state, batch: gp.step.lower(
                     *state, jax.device_put(batch, gp.batch_sharding)),
                 devices=len(devices))
