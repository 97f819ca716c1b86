r"""The external anchor of the pipeline benchmark: PyTorch's own pipelining of the same model.

  python -m experiments.bench_pipeline_torch --size gpt2_medium --stages 2 --schedule 1f1b
  python -m experiments.bench_pipeline_torch --size tiny --stages 2 --cpu     # gloo, seconds

Prints one JSON line (step seconds, tokens/s, the last loss, versions, date, command) and
writes it to OUT/bench_pipeline_torch_SIZE_P<stages>_<schedule>.json (--out '': print only;
no JAX import here, so no JAX backend takes GPU memory). The model is the one
configs/bench_pipeline.py:SIZE gives accel (the GPT-2 decoder experiments/bench_lm_torch.py
writes: PreLN, GELU (tanh), biases, learned positions, tied embedding; d_ff from the
preset), trained with Adam (the preset's lr, no weight decay, no clipping) on random
tokens, bfloat16 autocast where the preset computes in bfloat16.

--stages 1: the whole model in one process (PyTorch's one-GPU step, the ratio's base).
--stages P: one process per GPU (torch.multiprocessing, NCCL; --cpu: gloo), the blocks cut
into P equal runs; stage 0 also holds the embeddings, stage P-1 the final LayerNorm and the
output projection, whose weight is a copy of the token embedding: after each step's
backward the two copies' gradients are summed over those two ranks (the tied model, as
Megatron-LM keeps it), so they stay equal. `torch.distributed.pipelining` runs the
schedule: ScheduleGPipe (all forwards, then all backwards) or Schedule1F1B, with the
global batch in --microbatches micro-batches.
torch.compile of each stage on CUDA (--no-compile: eager); a stage that fails to compile
runs eagerly and the output says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from configs import bench_pipeline
from experiments.bench_lm_torch import Block


class GPT(nn.Module):
  """The whole model: embeddings, blocks, final LayerNorm, tied output projection."""

  def __init__(self, cfg):
    super().__init__()
    m = cfg.model
    self.wte = nn.Embedding(cfg.data.vocab_size, m.d_model)
    self.wpe = nn.Embedding(cfg.data.seq_len, m.d_model)
    self.blocks = nn.ModuleList(Block(m.d_model, m.num_heads, m.d_ff)
                                for _ in range(m.num_layers))
    self.ln_f = nn.LayerNorm(m.d_model)
    for module in self.modules():   # GPT-2's initialisation
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)

  def forward(self, x):
    return Stage(self, 0, len(self.blocks), True, True)(x)


class Stage(nn.Module):
  """Blocks [start, stop) of `model`; the first stage embeds, the last one has the final
  LayerNorm and the output projection (its weight: `head`, the token table or a copy)."""

  def __init__(self, model: GPT, start: int, stop: int, first: bool, last: bool,
               head: nn.Parameter | None = None):
    super().__init__()
    self.first, self.last = first, last
    if first:
      self.wte, self.wpe = model.wte, model.wpe
    self.blocks = nn.ModuleList(model.blocks[start:stop])
    if last:
      self.ln_f = model.ln_f
      self.head = head if head is not None else model.wte.weight

  def forward(self, x):
    if self.first:
      x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
    for block in self.blocks:
      x = block(x)
    return F.linear(self.ln_f(x), self.head) if self.last else x


def _tokens(cfg, device):
  """The benchmark's batch: (inputs, targets) [B, L] of random ids, the same in every
  process (its own generator, untouched by the initialisation)."""
  gen = torch.Generator(device='cpu').manual_seed(1)
  tokens = torch.randint(0, cfg.data.vocab_size, (cfg.batch_size, cfg.data.seq_len + 1),
                         generator=gen).to(device)
  return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loss(logits, targets):
  return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='tiny', choices=bench_pipeline.SIZES)
  ap.add_argument('--stages', type=int, default=2)
  ap.add_argument('--schedule', default='1f1b', choices=('gpipe', '1f1b'))
  ap.add_argument('--microbatches', type=int, default=4)
  ap.add_argument('--batch', type=int, default=0, help='global batch (0: the preset)')
  ap.add_argument('--iters', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--out', default='results', help="folder of the JSON ('': print only)")
  ap.add_argument('--cpu', action='store_true', help='gloo on CPU processes (a test size)')
  ap.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                  help='torch.compile each stage (default: on CUDA)')
  return ap.parse_args()


def _setting(args):
  cfg = bench_pipeline.get_config(args.size)
  if cfg.model.name != 'transformer_lm':
    raise SystemExit(f'error: --size {args.size} is a {cfg.model.name}; the PyTorch anchor '
                     'writes the GPT-2 decoder only')
  if args.batch:
    cfg.batch_size = args.batch
  if cfg.model.num_layers % args.stages:
    raise SystemExit(f'error: {cfg.model.num_layers} layers do not cut into {args.stages} '
                     'equal stages')
  if args.stages > 1 and cfg.batch_size % args.microbatches:
    raise SystemExit(f'error: batch {cfg.batch_size} does not split into '
                     f'{args.microbatches} micro-batches')
  return cfg


def _compiled(module, wanted: bool, device):
  if not (wanted if wanted is not None else device.type == 'cuda'):
    return module, False, None
  try:
    return torch.compile(module), True, None
  except Exception as e:  # pylint: disable=broad-except
    return module, False, f'{type(e).__name__}: {str(e)[:200]}'


def _timed(step, warmup: int, iters: int, device) -> tuple[float, float]:
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  loss = None
  for _ in range(warmup):
    loss = step()
  sync()
  start = time.perf_counter()
  for _ in range(iters):
    loss = step()
  sync()
  return (time.perf_counter() - start) / iters, loss


def _one_process(args, cfg) -> dict:
  device = torch.device('cpu' if args.cpu or not torch.cuda.is_available() else 'cuda')
  torch.manual_seed(0)
  model = GPT(cfg).to(device)
  opt = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
  run, compiled, error = _compiled(model, args.compile, device)
  idx, targets = _tokens(cfg, device)
  bf16 = cfg.model.dtype == 'bfloat16'

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      loss = _loss(run(idx), targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  seconds, loss = _timed(step, args.warmup, args.iters, device)
  return {'step_s': seconds, 'loss': float(loss), 'compiled': compiled,
          'compile_error': error, 'device': str(device)}


def _rank(rank: int, args, cfg, out_path: str) -> None:
  """One pipeline stage's process."""
  from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
  p = args.stages
  cuda = not args.cpu and torch.cuda.is_available()
  device = torch.device(f'cuda:{rank}' if cuda else 'cpu')
  if cuda:
    torch.cuda.set_device(device)
  dist.init_process_group('nccl' if cuda else 'gloo', rank=rank, world_size=p)
  n = cfg.model.num_layers // p
  torch.manual_seed(0)
  model = GPT(cfg)                # every rank the same initial model; each keeps its part
  first, last = rank == 0, rank == p - 1
  head = nn.Parameter(model.wte.weight.detach().clone()) if last else None   # the copy
  stage_module = Stage(model, rank * n, (rank + 1) * n, first, last, head).to(device)
  ends = dist.new_group([0, p - 1])
  table = stage_module.wte.weight if first else stage_module.head if last else None
  opt = torch.optim.Adam(stage_module.parameters(), lr=cfg.optimizer.lr)
  run, compiled, error = _compiled(stage_module, args.compile, device)
  stage = PipelineStage(run, rank, p, device)
  schedule_cls = ScheduleGPipe if args.schedule == 'gpipe' else Schedule1F1B
  schedule = schedule_cls(stage, args.microbatches, loss_fn=_loss)
  idx, targets = _tokens(cfg, device)
  bf16 = cfg.model.dtype == 'bfloat16'

  def step():
    losses = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      if rank == 0:
        schedule.step(idx)
      elif rank == p - 1:
        schedule.step(target=targets, losses=losses)
      else:
        schedule.step()
    if table is not None and table.grad is not None:
      dist.all_reduce(table.grad, group=ends)   # each copy's part: the tied gradient
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack(losses).mean().detach() if losses else torch.zeros(())
  seconds, loss = _timed(step, args.warmup, args.iters, device)
  times = [None] * p
  dist.all_gather_object(times, seconds)
  if rank == p - 1:
    with open(out_path, 'w') as f:
      json.dump({'step_s': max(times), 'loss': float(loss), 'compiled': compiled,
                 'compile_error': error, 'device': str(device)}, f)
  dist.destroy_process_group()


def main():
  args = _args()
  cfg = _setting(args)
  if args.stages == 1:
    result = _one_process(args, cfg)
  else:
    import torch.multiprocessing as mp  # pylint: disable=g-import-not-at-top
    if not args.cpu and torch.cuda.device_count() < args.stages:
      raise SystemExit(f'error: {args.stages} stages need {args.stages} GPUs, found '
                       f'{torch.cuda.device_count()} (--cpu: processes on the CPU)')
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    os.environ.setdefault('MASTER_PORT', str(29500 + os.getpid() % 1000))
    with tempfile.TemporaryDirectory() as tmp:
      out_path = os.path.join(tmp, 'result.json')
      mp.spawn(_rank, args=(args, cfg, out_path), nprocs=args.stages, join=True)
      with open(out_path) as f:
        result = json.load(f)
  tokens = cfg.batch_size * cfg.data.seq_len
  result.update(size=args.size, stages=args.stages, microbatches=args.microbatches,
                schedule=args.schedule if args.stages > 1 else 'none', batch=cfg.batch_size,
                tokens_per_s=tokens / result['step_s'], torch=torch.__version__,
                ln_vocab=math.log(cfg.data.vocab_size),
                date=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                command=' '.join(['python -m experiments.bench_pipeline_torch', *sys.argv[1:]]))
  print(json.dumps(result), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    name = f'bench_pipeline_torch_{args.size}_P{args.stages}_{result["schedule"]}.json'
    with open(os.path.join(args.out, name), 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  sys.exit(main())
