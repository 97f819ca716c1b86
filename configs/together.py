r"""The methods together: progressive layer dropping, FP8 GEMMs with chunked FP16
accumulation and the standardization loss in one byte-level Transformer LM run.

The model, data and optimizer are those of configs/lm.py (same presets); on top:
- layerdrop (papers.md section 2): theta_bar 0.5; gamma set per preset so that theta(t) is
  within 1% of theta_bar after about a quarter of the run (exp(-gamma T / 4) <= 0.02);
- lowprec (section 3): every Dense of the blocks computes its forward, backward-data and
  weight-gradient GEMMs with 1-5-2 operands and 1-6-9 accumulation in chunks of 64, the
  embedding / tied output projection at full precision (exempt_first_last), 1-6-9 weights
  and optimizer state with stochastic rounding;
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
Expected: see results/tables/together_<scale>.md.
"""
from configs import lm

GAMMA = {'smoke': 0.2, 'cpu': 0.05, 'gpu': 0.003, 'paper': 0.0003}


def get_config(arg: str = 'cpu'):
  c = lm.get_config(arg)
  c.layerdrop.enabled = True
  c.layerdrop.theta_bar = 0.5
  c.layerdrop.gamma = GAMMA[arg]
  c.lowprec.enabled = True
  for gemm in ('fwd', 'bwd_data', 'bwd_weight'):
    c.lowprec[gemm].operand_fmt = 'e5m2'
    c.lowprec[gemm].acc_fmt = 'e6m9'
    c.lowprec[gemm].chunk_size = 64
  c.lowprec.exempt_first_last = True
  c.lowprec.update_fmt = 'e6m9'
  c.lowprec.update_rounding = 'stochastic'
  c.stdloss.enabled = True
  c.stdloss.layers = 'fc_in$'
  c.stdloss.weight = 1e-3
  return c
