r"""The bar for bench_lm: a compact PyTorch GPT-2-small train step, as a user would write it.

  python -m experiments.bench_lm_torch [--batch 32] [--iters 20]    # prints one JSON line

torch.compile, scaled_dot_product_attention (flash), bf16 autocast, fused AdamW, tied
embeddings, the same sizes as experiments/bench_lm.py. Run by bench_lm in a subprocess (two
frameworks in one process would fight over device memory) with --serve: after the warm-up
it answers bench_lm's requests for N timed steps (accel.benchmarking.serve), so it is timed
in the same interleaved rounds as accel's variants. Needs torch with CUDA.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, d, heads, d_ff=None):
    super().__init__()
    self.heads = heads
    d_ff = d_ff or 4 * d
    self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.fc, self.out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate='tanh'))


class GPT(nn.Module):

  def __init__(self, vocab=50304, ctx=1024, layers=12, d=768, heads=12):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
    self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d)
    self.head = nn.Linear(d, vocab, bias=False)
    self.head.weight = self.wte.weight
    for module in self.modules():   # GPT-2's initialisation (PyTorch's N(0, 1) embedding
      if isinstance(module, (nn.Linear, nn.Embedding)):   # would give huge initial logits)
        nn.init.normal_(module.weight, std=0.02)

  def forward(self, idx, targets):
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
    for block in self.blocks:
      x = block(x)
    logits = self.head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=1024)
  parser.add_argument('--iters', type=int, default=20)
  parser.add_argument('--serve', action='store_true',
                      help='after the warm-up, serve timed rounds to bench_lm (stdin/stdout)')
  args = parser.parse_args()
  start_s = time.perf_counter()
  torch.backends.cuda.matmul.allow_tf32 = True
  model = GPT(ctx=args.seq).cuda()
  opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=True)
  step_model = torch.compile(model)
  x = torch.randint(0, 50304, (args.batch, args.seq + 1), device='cuda')
  idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

  def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      loss = step_model(idx, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
  for _ in range(3):
    loss = step()
  torch.cuda.synchronize()
  warm_s = time.perf_counter() - start_s

  def run_steps(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n
  n = sum(p.numel() for p in model.parameters())
  info = {'loss': float(loss), 'torch': torch.__version__, 'params': n,
          'ln_50304': math.log(50304), 'warmup_s': warm_s}   # torch.compile runs in warm-up
  if args.serve:
    from accel.benchmarking import serve  # pylint: disable=g-import-not-at-top
    serve(run_steps, info)
    return
  seconds = run_steps(args.iters)
  flops_token = 6 * n + 12 * 12 * 768 * args.seq
  tokens = args.batch * args.seq
  print(json.dumps({'step_s': seconds, 'tokens_per_s': tokens / seconds,
                    'model_flops_per_s': flops_token * tokens / seconds, **info}))


if __name__ == '__main__':
  main()
