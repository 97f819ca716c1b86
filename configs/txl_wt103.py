r"""Transformer-XL word-level LM on WikiText-103 with the adaptive softmax (gpu, paper).

Command (each preset):
  python -m experiments.train --config configs/txl_wt103.py:smoke --workdir runs/txl_wt103_smoke
  python -m experiments.train --config configs/txl_wt103.py:cpu   --workdir runs/txl_wt103_cpu
  python -m experiments.train --config configs/txl_wt103.py:gpu   --workdir runs/txl_wt103_gpu
  python -m experiments.train --config configs/txl_wt103.py:paper --workdir runs/txl_wt103_paper
WikiText-103 (accel/data/corpora.py) downloads wikitext-103-v1.zip on first use, or put it
into $ACCEL_DATA_DIR/downloads/manual/; its vocabulary (267,735 words, most frequent first,
which the adaptive softmax's clusters rely on) is built from train at preparation and the
split sizes are checked against the published 103,227,021 / 217,646 / 245,569 tokens.
smoke and cpu are offline: the Shakespeare corpus with a word-level vocabulary trained on
its train split (data.tokenizer=words, accel/data/tokenization.py), so the adaptive softmax
runs on a frequency-ordered vocabulary as on WikiText-103; plumbing, not a result.

Model (accel/models/transformer_xl.py): relative positions, segment recurrence, PostLN,
embedding tied to the output. Head: the adaptive softmax (accel/models/adaptive_softmax.py,
Grave et al. 2017; Baevski & Auli 2019), div_val 1, clusters tied to the embedding; the
task's loss is -log p(target), and eval/perplexity = exp(eval/loss) is the metric
(no bits per byte for words).

paper: the Transformer-XL base WikiText-103 settings (papers.md section 1; the public code's
tf/scripts/wt103_base_gpu.sh and pytorch/run_wt103_base.sh): 16 layers, d_model 410,
10 heads, d_inner 2100, segment = memory = 150, batch 60, 200k steps, dropout 0.1, Adam
(0.9, 0.999, 1e-8) lr 2.5e-4, no warm-up, cosine decay to 0.004 lr, clip 0.25, adaptive
softmax cutoffs 20000, 40000, 200000, div_val 1. Not modelled: dropatt (0.0 in the base
script anyway), the evaluation with segment 64 and memory 640 (clamp_len 400), and the
input embedding's scaling by sqrt(d_model) happens here for every cluster (div_val 1 makes
the adaptive input a plain embedding). Reference: 24.0 test perplexity for this base model
(Dai et al. 2019, Table 1); papers.md's 18.3 is the large (18-layer, d 1024) model.
gpu: the same model for 20k steps (a one-GPU check of the recipe, not a result).
"""
from configs import txl_enwik8


def get_config(arg: str = 'cpu'):
  if arg not in ('smoke', 'cpu', 'gpu', 'paper'):
    raise ValueError(f'unknown preset {arg!r}; known: smoke, cpu, gpu, paper')
  # txl_enwik8's optimizer (Adam, cosine to 0.004 lr, clip 0.25) and schedule of steps; its
  # smoke and cpu models; gpu and paper: its gpu preset's dropout, lr and intervals
  c = txl_enwik8.get_config('gpu' if arg == 'paper' else arg)
  c.data.name = 'shakespeare'
  c.data.tokenizer = 'words'
  c.data.vocab_size = 512 if arg == 'smoke' else 4096
  c.model.adaptive_cutoffs = (64, 256) if arg == 'smoke' else (512, 1024, 2048)
  if arg == 'smoke':
    c.total_steps = 10
  elif arg in ('gpu', 'paper'):
    c.data.name = 'wikitext103'
    c.data.tokenizer = ''          # the corpus's own word-level vocabulary
    c.data.vocab_size = 0
    c.total_steps = 20_000 if arg == 'gpu' else 200_000
    c.batch_size = 60
    c.data.seq_len = 150
    c.model.mem_len = 150
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 16, 410, 10, 2100
    c.model.adaptive_cutoffs = (20_000, 40_000, 200_000)
  return c
