r"""Fine-tuning a pretrained PLD/BERT encoder: genre of a passage (offline), or a GLUE task.

The config argument is 'PRESET[,TASK]': PRESET smoke | cpu | gpu | paper, the one the
encoder was pretrained with (configs/pld_bert.py); TASK one of cola, sst2, mrpc, stsb, qnli,
rte (GLUE, accel/data/glue.py: data.name=glue/TASK), default the offline genre task.
Commands:
  python -m experiments.train --config configs/pld_bert.py:cpu --workdir runs/pld_cpu
  python -m experiments.train --config configs/pld_bert_finetune.py:cpu \
      --config.finetune.pretrained_workdir=runs/pld_cpu --workdir runs/pld_cpu_genre
  python -m experiments.train --config configs/pld_bert_finetune.py:paper,rte \
      --config.finetune.pretrained_workdir=runs/pld_paper --workdir runs/pld_paper_rte
Without finetune.pretrained_workdir the encoder starts from scratch (the no-pretraining
reference). Data: `shakespeare_genre` (accel/data/genre.py), validation on 6 held-out plays;
GLUE: the task's archive is downloaded on first use (or put into
$ACCEL_DATA_DIR/downloads/manual/), evaluated on its whole dev set with its own metrics
(eval/matthews CoLA; eval/accuracy SST-2, QNLI, RTE; eval/f1 and eval/accuracy MRPC;
eval/pearson and eval/spearman STS-B, a regression). With the byte vocabulary a pair is
cut to data.seq_len bytes (128 in gpu/paper: RTE and QNLI pairs are often longer); an
encoder pretrained with a subword tokenizer (--config.data.tokenizer=wordpiece
--config.data.vocab_size=...) is fine-tuned with the same two flags plus
--config.data.tokenizer_corpus=<its pretraining data.name>. gpu and paper train 5 epochs
of the task's published train size at batch 32, as PLD's GLUE fine-tuning.

Dropping is off during fine-tuning (PLD section 4: GLUE fine-tuned without it); the
model block is that of configs/pld_bert.py for the same preset. AdamW, linear decay.
Expected (cpu preset, 2026-11-28; results/layerdrop_findings.md): eval/accuracy 45.2% at
step 300 from the PLD-pretrained cpu encoder, 47.7% from scratch; the majority class
(history) is 38.2% of the evaluated passages.
"""
import math

import ml_collections

from configs import pld_bert

# GLUE train sizes (Wang et al. 2019, Table 1)
GLUE_TRAIN = {'cola': 8551, 'sst2': 67349, 'mrpc': 3668, 'stsb': 5749, 'qnli': 104743,
              'rte': 2490}
EPOCHS = 5


def get_config(arg: str = 'cpu'):
  preset, *rest = arg.split(',')
  if len(rest) > 1 or (rest and rest[0] not in GLUE_TRAIN):
    raise ValueError(f'bad config argument {arg!r}; expected PRESET[,TASK] with TASK in '
                     f'{", ".join(GLUE_TRAIN)}')
  c = pld_bert.get_config(preset)
  c.data.name = f'glue/{rest[0]}' if rest else 'shakespeare_genre'
  c.layerdrop.enabled = False
  c.finetune = ml_collections.ConfigDict()
  c.finetune.pretrained_workdir = ''
  c.optimizer.schedule = 'linear'
  c.optimizer.end_lr_fraction = 0.0
  c.eval_steps = -1 if preset in ('gpu', 'paper') else c.eval_steps
  if preset == 'smoke':
    c.total_steps = 10
  elif preset == 'cpu':
    c.total_steps = 300
    c.batch_size = 32
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 30
    c.eval_steps = 40
  elif preset in ('gpu', 'paper'):   # 5 epochs at batch 32, as PLD's GLUE fine-tuning
    c.total_steps = 4000
    c.batch_size = 32
    c.optimizer.lr = 5e-5
    c.optimizer.warmup_steps = 400
    c.eval_every = 1000
    c.checkpoint_every = 4000
    if rest:
      c.total_steps = math.ceil(EPOCHS * GLUE_TRAIN[rest[0]] / c.batch_size)
      c.optimizer.warmup_steps = c.total_steps // 10
      c.eval_every = c.checkpoint_every = max(c.total_steps // 5, 1)
  return c
