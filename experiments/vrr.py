r"""Accumulation bit-width table and VRR plot (Sakr et al. 2019; accel.lowprec.vrr).

  python -m experiments.vrr --out results/lowprec_vrr            # ~10 min on 2 CPU cores
  python -m experiments.vrr --quick --out /tmp/vrr               # seconds

For each network, the lengths of its accumulations are read off its layers (fan-in for
the forward GEMM, fan-out for backward-data, batch x spatial for the weight gradient);
the table gives, for the longest accumulation of each GEMM kind, the smallest accumulator
mantissa m_acc (8 exponent bits) whose Monte Carlo VRR meets the criterion
|1 - VRR| <= max_loss, with plain sequential accumulation and with chunks of --chunk.
Writes DIR.md, DIR.json and DIR.png (VRR against n for several m_acc).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp

from accel import benchmarking, models
from accel.data.input_pipeline import DatasetInfo
from accel.lowprec import vrr
from configs import lm, stdloss_resnet


def _lm(preset: str):
  """configs/lm.py:PRESET's model as accel.models builds it, every GEMM through the hook."""
  config = lm.get_config(preset)
  info = DatasetInfo('lm', vocab_size=256)
  build = lambda r: models.build_model(config, info, dot_general=r.dot_general,
                                       head_dot_general=r.dot_general)
  return build, jnp.zeros((config.batch_size, config.data.seq_len), jnp.int32)


def _resnet(depth: int, batch: int):
  """The CIFAR ResNet-DEPTH of configs/stdloss_resnet.py on 32x32x3 images."""
  config = stdloss_resnet.get_config('cpu')
  config.model.depth = depth
  info = DatasetInfo('image', num_classes=10, image_shape=(32, 32, 3))
  build = lambda r: models.build_model(config, info, dot_general=r.dot_general,
                                       conv_general_dilated=r.conv)
  return build, jnp.zeros((batch, 32, 32, 3), jnp.float32)


NETWORKS = {
    'resnet32_cifar_b128': lambda: _resnet(32, 128),
    'lm_cpu': lambda: _lm('cpu'),
    'lm_gpu': lambda: _lm('gpu'),
    'resnet8_cifar_b8': lambda: _resnet(8, 8),       # --quick
    'lm_smoke': lambda: _lm('smoke'),                # --quick
}


def _round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def curves_until_met(lengths: list[int], n_max: int, max_loss: float, chunk: int | None,
                     trials: int, m_range: range) -> dict:
  """VRR curves for increasing m_acc until every length meets the criterion."""
  curves = {}
  for m in m_range:
    curves[m] = vrr.vrr_curve(m, n_max, chunk_size=chunk, trials=trials, block=16)
    if all(vrr.smallest_m_acc(n, max_loss, curves) is not None for n in lengths):
      break
  return curves


def _plot(curves_plain, curves_chunk, chunk, path, show_m):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, m in enumerate(show_m):
    color = f'C{i}'
    if m in curves_plain:
      ax.plot(*curves_plain[m], color=color, label=f'm_acc={m}')
    if m in curves_chunk:
      ax.plot(*curves_chunk[m], color=color, ls='--')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('accumulation length n')
  ax.set_ylabel('VRR = Var(computed) / Var(exact)')
  ax.set_title(f'VRR of N(0,1) sums; solid: sequential, dashed: chunks of {chunk}')
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--networks', default='resnet32_cifar_b128,lm_cpu,lm_gpu')
  p.add_argument('--max_loss', type=float, default=0.01, help='criterion: |1 - VRR| <= max_loss')
  p.add_argument('--chunk', type=int, default=64)
  p.add_argument('--trials', type=int, default=1024)
  p.add_argument('--out', default='results/lowprec_vrr', help='writes OUT.md, OUT.json, OUT.png')
  p.add_argument('--quick', action='store_true', help='tiny networks and trials (seconds)')
  args = p.parse_args(argv)
  if args.quick:
    args.networks, args.trials = 'resnet8_cifar_b8,lm_smoke', 128
  start = time.time()

  rows, all_lengths = [], []
  for name in args.networks.split(','):
    build, inputs = NETWORKS[name]()
    layers = vrr.accumulation_lengths_of(build, inputs)
    for kind in ('fwd', 'bwd', 'grad'):
      ns = sorted({d[kind] for _, d in layers})
      rows.append({'network': name, 'gemm': kind, 'lengths': ns, 'n': ns[-1]})
      all_lengths.append(ns[-1])
  n_max = _round_up(max(all_lengths), max(16, args.chunk))
  m_range = range(3, 24)
  plain = curves_until_met(all_lengths, n_max, args.max_loss, None, args.trials, m_range)
  chunked = curves_until_met(all_lengths, n_max, args.max_loss, args.chunk, args.trials, m_range)
  for r in rows:
    r['m_acc_plain'] = vrr.smallest_m_acc(r['n'], args.max_loss, plain)
    r['m_acc_chunked'] = vrr.smallest_m_acc(r['n'], args.max_loss, chunked)

  head = (f'| network | GEMM | lengths | longest n | m_acc sequential | m_acc chunk {args.chunk} |\n'
          '|---|---|---|---:|---:|---:|')
  lines = [head] + [
      f"| {r['network']} | {r['gemm']} | {', '.join(map(str, r['lengths']))} | {r['n']} | "
      f"{r['m_acc_plain']} | {r['m_acc_chunked']} |" for r in rows]
  table = '\n'.join(lines)
  meta = dict(benchmarking.provenance(), criterion=f'|1 - VRR| <= {args.max_loss}',
              trials=args.trials, chunk=args.chunk, n_max=n_max,
              seconds=round(time.time() - start, 1))
  markdown = (
      '# Smallest accumulator mantissa per GEMM (Monte Carlo VRR)\n\n'
      f"{benchmarking.provenance_line(meta)} {meta['seconds']} s.\n\n"
      f"Terms i.i.d. N(0,1); accumulator 1-8-m_acc with round-to-nearest-even; "
      f"{args.trials} paired trials; criterion {meta['criterion']} at the longest "
      f"accumulation of each GEMM kind (VRR falls with n).\n\n{table}\n\n"
      f"![VRR]({os.path.basename(args.out)}.png)\n")
  curves = {'plain': {m: [c[0].tolist(), c[1].tolist()] for m, c in plain.items()},
            'chunked': {m: [c[0].tolist(), c[1].tolist()] for m, c in chunked.items()}}
  benchmarking.write_results(os.path.dirname(args.out) or '.', os.path.basename(args.out),
                             {'meta': meta, 'rows': rows, 'curves': curves}, markdown)
  show = sorted(set(plain) | set(chunked))
  show = show[::max(1, len(show) // 6)]
  _plot(plain, chunked, args.chunk, args.out + '.png', show)
  print(f'wrote {args.out}.md/.json/.png in {meta["seconds"]} s')


if __name__ == '__main__':
  main()
