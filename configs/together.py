r"""The methods together: progressive layer dropping, FP8 GEMMs with chunked FP16
accumulation and the standardization loss in one byte-level Transformer LM run.

The model, data and optimizer are those of configs/lm.py (same presets; at cpu 4 layers of
d_model 64, d_ff 256, sequences of 64 bytes, as the FP8 emulation is slow on CPU); on top:
- layerdrop (papers.md section 2): theta_bar 0.5, gamma = 16 / total_steps, so that theta(t)
  is within 0.01 of theta_bar after a quarter of the run (0.5 exp(-4) = 0.009);
- lowprec (section 3): every Dense of the blocks computes its forward, backward-data and
  weight-gradient GEMMs with 1-5-2 operands and 1-6-9 accumulation in chunks of 64, the
  embedding / tied output projection at full precision (exempt_first_last), 1-6-9 weights
  and optimizer state with stochastic rounding, loss scale 1024; float32 compute dtype in
  every preset (the emulation's), so the runs without FP8 are float32 too;
- stdloss (section 4): on the pre-activation of each block's first FFN layer (`fc_in`, the
  only Dense that feeds a nonlinearity), lambda 1e-3 (not a paper value: the paper has none
  for Transformers; its values run from 1e-6 for ResNet-50 to 1 for the MNIST CNN).
Each method can be switched off with --config.METHOD.enabled=false; the `together` paper
table (python -m experiments.reproduce together) trains the baseline, each method alone,
each pair and all three.

Commands:
  python -m experiments.train --config configs/together.py:smoke --workdir runs/together_smoke
  python -m experiments.train --config configs/together.py:cpu --workdir runs/together_cpu
  python -m experiments.reproduce together --scale cpu
Expected (measured 2026-11-28 on 2 shared CPU cores): results/tables/together_smoke.md and
results/tables/together_cpu.md (final eval loss, steps to the baseline's loss, step time and
executed FLOPs of each combination).
"""
from configs import lm


def get_config(arg: str = 'cpu'):
  c = lm.get_config(arg)
  if arg == 'cpu':   # smaller than lm.py's: the FP8 emulation makes every GEMM a scan of chunks
    c.data.seq_len = 64
    c.model.update(num_layers=4, d_model=64, num_heads=2, d_ff=256)
  c.layerdrop.enabled = True
  c.layerdrop.theta_bar = 0.5
  c.layerdrop.gamma = 16.0 / c.total_steps   # 0.5 exp(-gamma T / 4) = 0.009
  c.lowprec.enabled = True
  for gemm in ('fwd', 'bwd_data', 'bwd_weight'):
    c.lowprec[gemm].operand_fmt = 'e5m2'
    c.lowprec[gemm].acc_fmt = 'e6m9'
    c.lowprec[gemm].chunk_size = 64
  c.lowprec.exempt_first_last = True
  c.lowprec.loss_scale = 1024.0    # as configs/fp8_lm.py: small errors stay above e5m2's subnormals
  c.model.dtype = 'float32'        # the emulation computes in float32; the same for every run
  c.lowprec.update_fmt = 'e6m9'
  c.lowprec.update_rounding = 'stochastic'
  c.stdloss.enabled = True
  c.stdloss.layers = 'fc_in$'
  c.stdloss.weight = 1e-3
  return c
