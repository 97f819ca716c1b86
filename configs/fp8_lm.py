r"""FP8 training of the byte-level Shakespeare LM (Wang et al. 2018, papers.md section 3).

All three GEMMs of every Dense in the blocks take e5m2 operands and accumulate in e6m9
(1-6-9) in chunks; weights, gradients and Adam's state live in e6m9 with stochastic
rounding in the update (no float32 master copy); the tied output projection stays float32
(lowprec.exempt_first_last; the input side is an embedding lookup). The GEMMs run in
'fast' mode (chunk sums in float32, rounded to e6m9, added in e6m9), which with chunk 1 is
exactly sequential e6m9 accumulation, with impl 'auto': the Pallas kernels on a GPU (chunk 1
is then the exact kernel's one pass over K, not a K-step scan: that JAX path took 0.58 s per
LM step on an H200, results/tables/lowprec_gpu.md), the JAX path elsewhere.

The config argument is 'PRESET[,VARIANT]':
  PRESET   smoke (seconds) | cpu (2-layer d=64, 300 steps, minutes on CPU) |
           gpu (configs/lm.py:cpu size, 2000 steps) | paper (configs/lm.py:gpu size)
  VARIANT  fp8 (default: chunk 64) | fp32 (lowprec off) | fp8_chunk1 (chunk 1 in all three
           GEMMs) | fp8_nearest (round-to-nearest in the weight update)
`get_sweep(preset)` lists the four variants for experiments.sweep.

Commands:
  python -m experiments.train --config configs/fp8_lm.py:cpu,fp8 --workdir runs/fp8_lm
  python -m experiments.sweep --config configs/fp8_lm.py:cpu --sweep_dir runs/fp8_lm_cpu \
      --metrics eval/loss,eval/accuracy        # the four variants (get_sweep)
Expected (cpu preset, 2 shared CPU cores, 2026-11-28; results/lowprec_fp8_lm_cpu.md): final
eval loss fp32 2.373, fp8 2.376, fp8_chunk1 2.380, fp8_nearest 2.385 (one seed each);
fp8 step ~2x the fp32 step time on CPU.
"""
from configs import lm

VARIANTS = ('fp8', 'fp32', 'fp8_chunk1', 'fp8_nearest')
PRESETS = ('smoke', 'cpu', 'gpu', 'paper')


def set_variant(c, variant: str) -> None:
  """lowprec block for one of VARIANTS (shared with configs/fp8_resnet.py)."""
  c.lowprec.enabled = variant != 'fp32'
  for gemm in ('fwd', 'bwd_data', 'bwd_weight'):
    c.lowprec[gemm].update(operand_fmt='e5m2', acc_fmt='e6m9', mul_fmt='fp32', mode='fast',
                           chunk_size=1 if variant == 'fp8_chunk1' else 64, impl='auto')
  c.lowprec.update_fmt = 'e6m9'
  c.lowprec.update_rounding = 'nearest' if variant == 'fp8_nearest' else 'stochastic'


def parse(arg: str, presets=PRESETS) -> tuple[str, str]:
  preset, *rest = arg.split(',')
  variant = rest[0] if rest else 'fp8'
  if preset not in presets or len(rest) > 1 or variant not in VARIANTS:
    raise ValueError(f'bad config argument {arg!r}; expected PRESET[,VARIANT] with PRESET in '
                     f'{presets}, VARIANT in {VARIANTS}')
  return preset, variant


def get_config(arg: str = 'cpu'):
  preset, variant = parse(arg)
  c = lm.get_config({'smoke': 'smoke', 'cpu': 'smoke', 'gpu': 'cpu', 'paper': 'gpu'}[preset])
  c.model.dtype = 'float32'        # the emulation computes in float32 whatever the preset
  c.lowprec.loss_scale = 1024.0    # keeps small errors above e5m2's subnormals
  if preset == 'cpu':
    c.total_steps = 300
    c.batch_size = 16
    c.data.seq_len = 64
    c.model.update(num_layers=2, d_model=64, num_heads=2, d_ff=256)
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.eval_every = 100
    c.eval_steps = 10
    c.log_every = 20
    c.checkpoint_every = 300
    c.keep_checkpoints = 1
  elif preset == 'gpu':
    c.total_steps = 2000
  set_variant(c, variant)
  return c


def variant_overrides(variant: str) -> dict:
  """The overrides turning the default fp8 variant into `variant` (for experiments.sweep)."""
  chunks = 'lowprec.fwd.chunk_size', 'lowprec.bwd_data.chunk_size', 'lowprec.bwd_weight.chunk_size'
  return {'fp8': {'lowprec.enabled': True},
          'fp32': {'lowprec.enabled': False},
          'fp8_chunk1': dict.fromkeys(chunks, 1),
          'fp8_nearest': {'lowprec.update_rounding': 'nearest'}}[variant]


def get_sweep(preset: str = 'cpu') -> list[dict]:
  """The four variants of the comparison, as overrides of PRESET (default variant fp8)."""
  del preset
  return [variant_overrides(v) for v in VARIANTS]
