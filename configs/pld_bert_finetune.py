r"""Fine-tuning a pretrained PLD/BERT encoder: genre (comedy/history/tragedy) of a passage.

Command (the preset must be the one the encoder was pretrained with):
  python -m experiments.train --config configs/pld_bert.py:cpu --workdir runs/pld_cpu
  python -m experiments.train --config configs/pld_bert_finetune.py:cpu \
      --config.finetune.pretrained_workdir=runs/pld_cpu --workdir runs/pld_cpu_genre
Without finetune.pretrained_workdir the encoder starts from scratch (the no-pretraining
reference). Data: `shakespeare_genre` (accel/data/genre.py), validation on 6 held-out plays.

Dropping is off during fine-tuning (PLD section 4: GLUE fine-tuned without it); the
model block is that of configs/pld_bert.py for the same preset. AdamW, linear decay.
Expected (cpu preset, 2026-11-28; results/layerdrop_findings.md): eval/accuracy 45.2% at
step 300 from the PLD-pretrained cpu encoder, 47.7% from scratch; the majority class
(history) is 38.2% of the evaluated passages.
"""
import ml_collections

from configs import pld_bert


def get_config(arg: str = 'cpu'):
  c = pld_bert.get_config(arg)
  c.data.name = 'shakespeare_genre'
  c.layerdrop.enabled = False
  c.finetune = ml_collections.ConfigDict()
  c.finetune.pretrained_workdir = ''
  c.optimizer.schedule = 'linear'
  c.optimizer.end_lr_fraction = 0.0
  c.eval_steps = -1 if arg in ('gpu', 'paper') else c.eval_steps
  if arg == 'smoke':
    c.total_steps = 10
  elif arg == 'cpu':
    c.total_steps = 300
    c.batch_size = 32
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 30
    c.eval_steps = 40
  elif arg in ('gpu', 'paper'):   # 5 epochs at batch 32, as PLD's GLUE fine-tuning
    c.total_steps = 4000
    c.batch_size = 32
    c.optimizer.lr = 5e-5
    c.optimizer.warmup_steps = 400
    c.eval_every = 1000
    c.checkpoint_every = 4000
  return c
