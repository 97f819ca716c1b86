r"""BERT-style MLM pretraining with Progressive Layer Dropping (papers.md section 2).

Command (each preset; the matching baseline adds --config.layerdrop.enabled=False):
  python -m experiments.train --config configs/pld_bert.py:smoke --workdir runs/pld_smoke
  python -m experiments.train --config configs/pld_bert.py:cpu   --workdir runs/pld_cpu
  python -m experiments.train --config configs/pld_bert.py:gpu   --workdir runs/pld_gpu
  python -m experiments.train --config configs/pld_bert.py:paper --workdir runs/pld_paper \
      --config.data.name=text --config.data.path=/path/to/a/large/corpus
PostLN with dropping (the unstable combination PLD's PreLN avoids): --config.model.pre_ln=False.
Fine-tuning on the pretrained encoder: configs/pld_bert_finetune.py.

Model: bidirectional Transformer (`model.name=bert`), byte vocabulary + PAD/CLS/MASK,
input [CLS] + seq_len - 1 bytes, MLM head tied to the embeddings; 15% of tokens selected,
80/10/10 mask/random/unchanged (`accel.mlm`). Adam(W) (0.9, 0.999), weight decay 0.01,
gradient clip 1.0, linear warm-up over 2% of the steps, as in PLD's BERT setup.
Layer dropping: theta_bar 0.5; gamma 0.001 for the paper's 200K steps, larger for the short
presets so that theta reaches theta_bar early (theta(t) - theta_bar = 0.5 exp(-gamma t)).
gpu: BERT-base, batch 128 x 128, 5000 steps: at the baseline's 27 ms per step on one H200
(results/layerdrop_gpu.md) about 2.3 minutes of steps per run, chosen so the pretraining pair
and the fine-tuning fit one ~10-minute device call (an estimate: not yet run at this preset).
Expected (cpu preset, 2 shared CPU cores, 2026-11-28, with the 259-token byte vocabulary
before SEP made it 260, so the initialisation differs now; results/layerdrop_cpu.md and
results/layerdrop_findings.md): eval/loss (MLM, nats) 3.077 at step 400 with PLD, 3.115 for
the baseline; 4.25 of 6 layers run at steady state, 0.72x the baseline's FLOPs per step.
"""
from accel import config_lib


def _size(c, num_layers, d_model, num_heads, d_ff):
  c.model.num_layers, c.model.d_model = num_layers, d_model
  c.model.num_heads, c.model.d_ff = num_heads, d_ff


def get_config(arg: str = 'cpu'):
  c = config_lib.base_config()
  c.data.name = 'shakespeare'
  c.model.name = 'bert'
  c.model.pre_ln = True
  c.optimizer.name = 'adamw'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0
  c.layerdrop.enabled = True
  c.layerdrop.theta_bar = 0.5
  if arg == 'smoke':
    c.total_steps = 20
    c.batch_size = 8
    c.data.seq_len = 32
    _size(c, num_layers=4, d_model=32, num_heads=2, d_ff=64)
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 2
    c.layerdrop.gamma = 0.2
    c.eval_every = 10
    c.eval_steps = 2
    c.log_every = 5
    c.checkpoint_every = 10
  elif arg == 'cpu':
    c.total_steps = 400
    c.batch_size = 16
    c.data.seq_len = 128
    _size(c, num_layers=6, d_model=128, num_heads=4, d_ff=512)
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 8
    c.layerdrop.gamma = 0.02
    c.eval_every = 100
    c.eval_steps = 10
    c.log_every = 20
    c.checkpoint_every = 200
  elif arg == 'gpu':           # BERT-base at sequence length 128 on one GPU
    c.total_steps = 5000
    c.batch_size = 128
    c.data.seq_len = 128
    _size(c, num_layers=12, d_model=768, num_heads=12, d_ff=3072)   # BERT-base
    c.model.dropout_rate = 0.1
    c.model.dtype = 'bfloat16'
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 200
    c.layerdrop.gamma = 0.002    # gamma * total_steps = 10, as the paper's 0.001 at 10K steps
    c.eval_every = 500
    c.eval_steps = 20
    c.log_every = 100
    c.checkpoint_every = 2500
  elif arg == 'paper':         # BERT-base, batch 4K, 200K steps, PLD's public schedule
    c.total_steps = 200_000
    c.batch_size = 4096
    c.data.seq_len = 128
    _size(c, num_layers=12, d_model=768, num_heads=12, d_ff=3072)   # BERT-base
    c.model.dropout_rate = 0.1
    c.model.dtype = 'bfloat16'
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 4000
    c.optimizer.schedule = 'exponential'
    c.optimizer.decay_steps = 1000
    c.optimizer.decay_rate = 0.99
    c.layerdrop.gamma = 0.001
    c.eval_every = 5000
    c.eval_steps = 50
    c.log_every = 100
    c.checkpoint_every = 5000
  else:
    raise ValueError(f'unknown preset {arg!r}; known: smoke, cpu, gpu, paper')
  return c
