"""Ouroboros vs single device, data parallelism, naive model parallelism and GPipe.

  python -m experiments.bench_pipeline --quick --out results   # CPU, 2 simulated devices
  python -m experiments.bench_pipeline --out results           # 2 GPUs (~3 min on H200s)
  python -m experiments.bench_pipeline --model transformer_xl --out results   # Transformer-XL
  python -m experiments.bench_pipeline --quick --model transformer_xl --out results
  python -m experiments.bench_pipeline --size gpt2_medium --train_steps 0 --out results

Every variant is `accel.pipeline.variants` of one config (configs/bench_pipeline.py:SIZE;
default tiny with --quick, d512 otherwise): one device and data parallelism are the
spine's data-parallel step, the Ouroboros variants the spine's pipeline trainer, GPipe
`accel.pipeline.baselines` (M=1: naive model parallelism), all from the same params.

Part 1, throughput (tokens/s, global batch the same for every variant, all on the same
2 devices; median of 3 windows, variants timed round-robin): a balanced model (byte vocabulary: the blocks dominate) and an unbalanced
one (large vocabulary: the tied softmax makes the loss-side stage heavier).
Part 2, loss after a fixed token budget: the balanced model trained for the same number
of steps on the same batches (the Shakespeare corpus through accel/data: 4.79 MB train,
0.53 MB validation) by synchronous training and by Ouroboros; held-out loss in bits per
byte. (Results before 2026-12 used Python's standard-library sources, which differ between
Python versions.) The convergence study with the remedies: experiments/pipeline_staleness.py.
--prediction s adds the 'stored' Ouroboros variants with weight prediction s
(accel/pipeline/prediction.py), 'Ouroboros K=N untied stored pred s' and 'K=N+1 tied ring
stored pred s', to parts 1 and 2 (select them with --only 'stored pred').
Part 3, overlap: in the compiled Ouroboros step, how much compute XLA scheduled between
each asynchronous collective-permute start and its done.

--model transformer_xl: sizes tiny_xl (--quick, memory = segment = 64) and txl_base (12
layers, d_model 512, memory = segment = 512, batch 16), PreLN, no dropout, byte vocabulary. Part 1 times
single device and data parallel (segment training, the memory carried from step to step;
data parallel shards it with the batch rows, as segment training does) and the four
Ouroboros variants (each stage the memory of its own layers); no GPipe or naive model
parallelism (the GPipe baseline carries no memory per micro-batch). No part 2 (its batches
are random windows, not the contiguous streams segment training needs): --train_steps
other than 0 is an error. Part 3 as for the Transformer.

Writes DIR/bench_pipeline_{cpu,gpu}[_SIZE].json and .md (transformer_xl:
DIR/bench_pipeline_transformer_xl_{cpu,gpu}[_SIZE].*; _SIZE where --size is given).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


MODELS = ('transformer', 'transformer_xl')


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true', help='CPU, 2 simulated devices, tiny')
  ap.add_argument('--out', default='results')
  ap.add_argument('--devices', type=int, default=2, help='devices the variants share')
  ap.add_argument('--batch', type=int, default=0, help='global batch (0: the setting)')
  ap.add_argument('--dtype', default='', choices=('', 'float32', 'bfloat16'),
                  help="compute dtype (parameters stay float32; '': the preset's)")
  ap.add_argument('--train_steps', default='',
                  help='comma-separated step budgets for part 2 (empty: the setting; 0: skip)')
  ap.add_argument('--profile', default='', help='write perfetto traces of the single-device '
                  'and the Ouroboros K=2 stored step to DIR and print each device\'s busy time')
  ap.add_argument('--lr', type=float, default=0.0, help='peak learning rate (0: the setting)')
  ap.add_argument('--warmup_frac', type=float, default=0.0,
                  help='linear learning-rate warm-up over this fraction of each budget')
  ap.add_argument('--tag', default='', help='suffix of the results files')
  ap.add_argument('--only', default='', help='comma-separated name parts: time only the '
                  'variants whose name contains one (one device is always timed)')
  ap.add_argument('--overlap', action=argparse.BooleanOptionalAction, default=True,
                  help='part 3 (one more compile of the Ouroboros step)')
  ap.add_argument('--balanced_only', action='store_true', help='skip the large-vocabulary model')
  ap.add_argument('--prediction', type=float, default=0.0,
                  help="weight prediction s > 0 (accel/pipeline/prediction.py): add the "
                  "'stored' Ouroboros variants with it, named '... stored pred s'")
  ap.add_argument('--model', default='transformer', choices=MODELS,
                  help='transformer_xl: throughput and overlap only, byte vocabulary')
  ap.add_argument('--size', default='', help='preset of configs/bench_pipeline.py (default: '
                  'tiny / tiny_xl with --quick, d512 / txl_base otherwise)')
  return ap.parse_args()


ARGS = _args() if __name__ == '__main__' else None
if ARGS is not None and ARGS.quick:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={ARGS.devices}')
  os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tqdm  # noqa: E402

from accel import benchmarking  # noqa: E402
from accel.errors import UserError  # noqa: E402
from accel.pipeline import families, pieces, variants as pipeline_variants  # noqa: E402
from configs import bench_pipeline as sizes  # noqa: E402

# Timing and training settings; the model and batch come from the size's config.
SETTINGS = {
    True: dict(big_vocab=4096, steps=4, rounds=3, warmup=2, train_steps=150, lr=2e-3, micro=4),
    False: dict(big_vocab=32768, steps=10, rounds=3, warmup=3, train_steps=400, lr=1e-3,
                micro=4),
}


def corpus() -> tuple[np.ndarray, int]:
  """The Shakespeare corpus through accel/data (the same bytes on every Python): its train
  and validation splits concatenated, and where validation starts."""
  from accel.data import input_pipeline   # pylint: disable=g-import-not-at-top
  builder = input_pipeline.prepared('shakespeare', {})
  train, val = [input_pipeline.byte_stream(builder.as_data_source(split))
                for split in ('train', input_pipeline.eval_split(builder))]
  return np.concatenate([train, val]), len(train)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq - 1, batch)
    seq_BxL1 = np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int32)
    yield {'inputs': jnp.asarray(seq_BxL1[:, :-1]), 'targets': jnp.asarray(seq_BxL1[:, 1:])}


def bench_config(st, vocab: int, steps: int = 1):
  """The size's config (`configs/bench_pipeline.py`) with the flags' batch, dtype, vocabulary
  and learning rate, and a cosine schedule over `steps` after a linear warm-up of
  st['warmup_frac'] * steps (none by default, as the Transformer-XL enwik8 recipe)."""
  c = sizes.get_config(st['size'])
  c.batch_size = st['batch']
  c.data.vocab_size = vocab
  if st['dtype']:
    c.model.dtype = st['dtype']
  c.total_steps = steps
  c.optimizer.update(lr=st['lr'], warmup_steps=int(st['warmup_frac'] * steps))
  return c


def selected(name: str, only: str) -> bool:
  """Whether --only (comma-separated name parts; empty: all) keeps variant `name`."""
  return not only or any(part in name for part in only.split(','))


def variants(config, devs, st, params):
  """name -> `accel.pipeline.variants.Variant`, every one from `params`."""
  gpipe = config.model.name == 'transformer_lm'   # GPipe carries no memory per micro-batch
  names = pipeline_variants.names(len(devs), st['micro'], st['prediction'], gpipe=gpipe)
  if gpipe:
    names.insert(2, 'GPipe M=1')   # naive model parallelism
  return {name: pipeline_variants.build(name, config, params, devs) for name in names}


def throughput(built, params, data_iter, st):
  """tokens/s per variant: median over `rounds` windows of `steps` steps, the variants
  timed round-robin so that a change in machine load hits all of them alike."""
  del params   # each variant starts from the params it was built with
  states = {}
  for name, var in built.items():
    state = var.init()
    for _ in range(st['warmup']):
      state, loss = var.step(state, next(data_iter))
    jax.block_until_ready(loss)
    states[name] = state
  times = {name: [] for name in built}
  for _ in range(st['rounds']):
    for name, var in built.items():
      feed = [next(data_iter) for _ in range(st['steps'])]
      state = states[name]
      t0 = time.perf_counter()
      for b in feed:
        state, loss = var.step(state, b)
      jax.block_until_ready((state, loss))
      times[name].append(time.perf_counter() - t0)
      states[name] = state
  del states
  return {name: st['steps'] * st['batch'] * st['seq'] / float(np.median(t))
          for name, t in times.items()}


def overlap_report(variant, batch):
  """Counts compute ops between each collective-permute-start and its done."""
  text = variant.lower(variant.init(), batch).compile().as_text()
  lines = text.splitlines()
  pairs = []
  for i, line in enumerate(lines):
    m = re.search(r'(%\S+) = .* collective-permute-start\(', line)
    if not m:
      continue
    name = m.group(1)
    for j in range(i + 1, len(lines)):
      if 'collective-permute-done(' in lines[j] and re.search(re.escape(name) + r'[),]',
                                                             lines[j]):
        between = lines[i + 1:j]
        compute = sum(bool(re.search(r' (fusion|conditional|custom-call|dot|convolution)\(',
                                     x)) for x in between)
        pairs.append({'start': name, 'ops_between': j - i - 1, 'compute_ops_between': compute})
        break
  n_sync = sum(' collective-permute(' in x for x in lines)
  return {'async_pairs': pairs, 'sync_collective_permutes': n_sync}


def settings(args):
  size = args.size or {(True, 'transformer'): 'tiny', (True, 'transformer_xl'): 'tiny_xl',
                       (False, 'transformer'): 'd512',
                       (False, 'transformer_xl'): 'txl_base'}[args.quick, args.model]
  if size not in sizes.SIZES:
    raise UserError(f'--size {size!r}; known: {", ".join(sizes.SIZES)}')
  preset = sizes.get_config(size)
  if (preset.model.name == 'transformer_xl') != (args.model == 'transformer_xl'):
    raise UserError(f'--size {size} is a {preset.model.name}, not --model {args.model}')
  st = dict(SETTINGS[args.quick], dtype=args.dtype, model=args.model, size=size,
            prediction=args.prediction, batch=args.batch or preset.batch_size,
            seq=preset.data.seq_len, vocab=preset.data.vocab_size)
  if args.lr:
    st['lr'] = args.lr
  st['warmup_frac'] = args.warmup_frac
  budgets = ([int(x) for x in args.train_steps.split(',') if int(x)]
             if args.train_steps else [st['train_steps']])
  if args.model == 'transformer_xl':   # part 2's batches are not contiguous streams
    if args.train_steps and budgets:
      raise UserError('--model transformer_xl measures throughput only; give --train_steps 0')
    budgets = []
  st['train_steps'] = budgets
  return st


def train_and_eval(built, config, data, split, st, steps, devs):
  """Held-out bits/byte of each variant after `steps` steps on the same batches."""
  cfg = pipeline_variants.model_pieces(config).cfg
  eval_fn = jax.jit(lambda p, b: pieces.full_loss(cfg, p, b['inputs'], b['targets']))
  eval_batches = list(zip(range(8), batches(data[split:], st['batch'], st['seq'], 123)))
  runs = {}
  for name, var in built.items():
    state = var.init()
    it = batches(data[:split], st['batch'], st['seq'], 7)
    t0 = time.perf_counter()
    cpu = devs[0].platform == 'cpu'
    for _ in tqdm.trange(steps, desc=name, leave=False):
      state, loss = var.step(state, next(it))
      if cpu:   # one program in flight at a time (CPU collectives)
        jax.block_until_ready(loss)
    p_final = jax.device_put(var.to_model(state), devs[0])
    ev = np.mean([float(eval_fn(p_final, jax.device_put(b, devs[0]))) for _, b in eval_batches])
    runs[name] = {'eval_bits_per_byte': ev / np.log(2), 'seconds': time.perf_counter() - t0}
    print(f'{steps} steps {name:36s} eval {ev / np.log(2):.4f} bits/byte', flush=True)
  return {'train_steps': steps, 'tokens': steps * st['batch'] * st['seq'], 'runs': runs}


def profile(built, params, data_iter, st, out_dir):
  """Perfetto traces of a few steps; each device stream's busy time over the traced span."""
  from experiments import trace_summary
  report = {}
  del params
  for name in [n for n in built if n == 'one device' or ' untied stored' in n]:
    run = built[name].step
    state = built[name].init()
    for _ in range(st['warmup']):
      state, loss = run(state, next(data_iter))
    feed = [next(data_iter) for _ in range(5)]
    jax.block_until_ready((state, loss))
    path = os.path.join(out_dir, re.sub(r'\W+', '_', name))
    with jax.profiler.trace(path, create_perfetto_trace=True):
      for b in feed:
        state, loss = run(state, b)
      jax.block_until_ready((state, loss))
    trace = trace_summary.find_trace(path)
    report[name] = trace_summary.stream_busy(trace)
    print(f'--- {name}: {trace}')
    for stream, row in report[name].items():
      print(f'  {stream:60s} busy {row["busy_ms"]:8.2f} ms of {row["span_ms"]:8.2f} ms')
    del state
  return report


def main():
  args = ARGS
  st = settings(args)
  devs = jax.devices()[:args.devices]
  if len(devs) < args.devices or args.devices < 2:
    sys.exit(f'needs {max(2, args.devices)} devices, found {len(jax.devices())}')
  kind = ('cpu' if args.quick else devs[0].platform) + (f'_{args.size}' if args.size else '')
  data, split = corpus()
  record = benchmarking.provenance()
  record.update(settings=st, throughput={}, devices=[str(d.device_kind) for d in devs])

  # Part 1: throughput (Transformer-XL: the byte vocabulary only).
  models = [(f'{"balanced" if st["vocab"] == 256 else "preset"} (vocab {st["vocab"]})',
             st['vocab'])]
  if st['vocab'] == 256 and not (args.balanced_only or args.model == 'transformer_xl'):
    models = [('balanced (vocab 256)', 256),
              (f'unbalanced (vocab {st["big_vocab"]})', st['big_vocab'])]
  budget = max(st['train_steps'] or [1])
  for model, vocab in models:
    config = bench_config(st, vocab, budget)
    params = pipeline_variants.init_params(config)
    built = {name: v for name, v in variants(config, devs, st, params).items()
             if name == 'one device' or selected(name, args.only)}
    # Throughput does not depend on the token values: the big vocabulary reads random ids.
    source = data[:split] if vocab == 256 else np.random.default_rng(0).integers(
        0, vocab, 1_000_000).astype(np.int32)
    rows = throughput(built, params, batches(source, st['batch'], st['seq'], 0), st)
    for name, v in rows.items():
      print(f'{model:28s} {name:36s} {v:12.0f} tok/s', flush=True)
    record['throughput'][model] = rows
    if vocab == 256 and args.profile:
      record['profile'] = profile(built, params, batches(source, st['batch'], st['seq'], 1), st,
                                  args.profile)
    del built
    write(record, args.out, kind + args.tag)

  # Part 2: loss after fixed token budgets (byte vocabulary), the schedule spanning each.
  record['loss'] = []
  if st['train_steps'] and st['vocab'] != 256:
    raise UserError(f'--size {st["size"]} has a {st["vocab"]}-token vocabulary; the loss '
                    'part trains on bytes: give --train_steps 0')
  for steps in st['train_steps']:
    config = bench_config(st, 256, steps)
    params = pipeline_variants.init_params(config)
    built = {name: v for name, v in variants(config, devs, st, params).items()
             if name == 'one device' or (name.startswith('Ouroboros') and
                                         selected(name, args.only))}
    record['loss'].append(train_and_eval(built, config, data, split, st, steps, devs))
    write(record, args.out, kind + args.tag)   # a run cut short keeps what it finished

  # Part 3: overlap of transfers and compute in the compiled Ouroboros step.
  if not args.overlap:
    return
  n = len(devs)
  config = bench_config(st, st['vocab'])
  name = pipeline_variants.ouroboros_name(n, False, 'stored')
  variant = pipeline_variants.build(name, config, pipeline_variants.init_params(config), devs)
  record['overlap'] = overlap_report(variant, next(batches(data, st['batch'], st['seq'], 0)))
  write(record, args.out, kind + args.tag)


def write(record, out_dir, kind):
  n = len(record['devices'])
  xl = record['settings'].get('model') == 'transformer_xl'
  lines = [f'# Ouroboros pipeline benchmark{", Transformer-XL" if xl else ""} ({kind})', '',
           f'`{record["command"]}` — {record["date"]}, jax {record["jax"]}, commit '
           f'{record["git_commit"]}, devices {record["devices"]}', '',
           f'Settings: `{json.dumps(record["settings"])}`', '',
           *(['CPU quick mode: the simulated devices share the host cores (here 2 cores '
              'shared with other jobs), so the throughput ratios say nothing about GPUs; '
              'this mode checks that every variant runs and trains.', '']
             if kind.startswith('cpu') else []),
           *([f'Model: Transformer-XL (PreLN, memory = segment = {record["settings"]["seq"]}, '
              'carried from step to step; Ouroboros: each stage the memory of its own '
              'layers; data parallel: sharded with the batch rows). GPipe and naive model '
              'parallelism not run: the GPipe baseline carries no memory per micro-batch. '
              'No loss part: its batches are not contiguous streams.', '']
             if xl else []),
           f'## Throughput (tokens/s, same global batch, {n} devices)', '']
  for vocab_model, rows in record['throughput'].items():
    base_tp = rows['one device']
    gp = [v for name, v in rows.items() if name.startswith('GPipe')]
    lines += [f'### {vocab_model}', '', '| variant | tokens/s | vs single |' +
              (' vs GPipe |' if gp else ''), '|---|---|---|' + ('---|' if gp else '')]
    lines += [f'| {name} | {v:.0f} | {v / base_tp:.2f}x |' +
              (f' {v / gp[0]:.2f}x |' if gp else '') for name, v in rows.items()]
    lines.append('')
  for budget in record.get('loss', []):
    runs = budget['runs']
    sync = runs['one device']['eval_bits_per_byte']
    lines += [f'## Held-out bits/byte after {budget["train_steps"]} steps '
              f'({budget["tokens"]} tokens, cosine schedule over them)', '',
              '| variant | bits/byte | vs synchronous |', '|---|---|---|']
    lines += [f'| {name} | {r["eval_bits_per_byte"]:.4f} | '
              f'{100 * (r["eval_bits_per_byte"] / sync - 1):+.2f}% |' for name, r in runs.items()]
    lines.append('')
  for name, streams in record.get('profile', {}).items():
    lines += [f'## Profile: {name} (5 steps; busy = sum of kernel times on the stream)', '',
              '| stream | busy ms | span ms |', '|---|---|---|']
    lines += [f'| {s} | {r["busy_ms"]:.2f} | {r["span_ms"]:.2f} |' for s, r in streams.items()]
    lines.append('')
  ov = record.get('overlap') or {'async_pairs': [], 'sync_collective_permutes': 'not measured'}
  lines += [f'## Transfers vs compute in the compiled Ouroboros step (K={n} untied stored)', '',
            f'synchronous collective-permutes: {ov["sync_collective_permutes"]}; async pairs '
            f'(ops / compute ops between start and done): ' +
            (', '.join(f'{p["ops_between"]}/{p["compute_ops_between"]}'
                       for p in ov['async_pairs']) or 'none'), '']
  benchmarking.write_results(out_dir, f'bench_pipeline_{"transformer_xl_" if xl else ""}{kind}',
                             record, '\n'.join(lines))


if __name__ == '__main__':
  try:
    main()
  except UserError as e:
    sys.exit(f'error: {e}')
