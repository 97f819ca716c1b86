r"""The models the pipeline benchmarks time: one preset per size (global batch fixed per size).

  python -m experiments.bench_pipeline --quick --train_steps 0 --out results     # tiny, CPU
  python -m experiments.bench_pipeline --size gpt2_medium --train_steps 0 --out results
  python -m experiments.bench_pipeline_torch --size gpt2_medium --stages 2 --schedule 1f1b

Presets (data.vocab_size is the benchmark's vocabulary; the tokens are random, throughput
does not depend on them):
  tiny         CPU: 4 layers, d_model 64, seq 64, batch 8, bytes (the --quick size)
  tiny_xl      CPU: the same as a Transformer-XL, memory = segment = 64
  d512         8 layers, d_model 512, 8 heads, d_ff 2048, seq 512, batch 16, bytes, float32
               (results/bench_pipeline_gpu*.md so far)
  d512_vocab   the same with a 32768-token vocabulary: the tied softmax makes the loss-side
               stage heavier
  gpt2_medium  GPT-2-medium-like: 24 layers, d_model 1024, 16 heads, d_ff 4096, seq 1024,
               vocabulary 50304, tied, bfloat16 compute, batch 16
  txl_base     Transformer-XL base (Dai et al. 2019, enwik8): 12 layers, d_model 512,
               8 heads, d_ff 2048, memory = segment = 512, PreLN, bytes, batch 16
No dropout, no clipping: the variants time the same arithmetic. Adam lr 1e-3 cosine over
total_steps (the convergence part sets its own budget).
"""
from accel import config_lib

SIZES = ('tiny', 'tiny_xl', 'd512', 'd512_vocab', 'gpt2_medium', 'txl_base')


def get_config(arg: str = 'tiny'):
  if arg not in SIZES:
    raise ValueError(f'unknown preset {arg!r}; known: {", ".join(SIZES)}')
  c = config_lib.base_config()
  c.seed = 0
  c.total_steps = 1000
  c.progress_bar = False
  c.model.dropout_rate = 0.0
  c.model.pre_ln = True
  c.optimizer.update(name='adam', lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     schedule='cosine', warmup_steps=0, end_lr_fraction=0.0, clip_norm=0.0)
  c.pipeline.update(enabled=False, num_modules=2, tied_ring=False,
                    backward_weights='stored', weight_prediction=0.0)
  c.data.vocab_size = 256
  if arg in ('tiny', 'tiny_xl'):
    c.batch_size, c.data.seq_len = 8, 64
    c.model.update(num_layers=4, d_model=64, num_heads=4, d_ff=256)
  elif arg in ('d512', 'd512_vocab', 'txl_base'):
    c.batch_size, c.data.seq_len = 16, 512
    c.model.update(num_layers=12 if arg == 'txl_base' else 8, d_model=512, num_heads=8,
                   d_ff=2048)
    if arg == 'd512_vocab':
      c.data.vocab_size = 32768
  else:   # gpt2_medium
    c.batch_size, c.data.seq_len, c.data.vocab_size = 16, 1024, 50304
    c.model.update(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, dtype='bfloat16')
  if arg in ('tiny_xl', 'txl_base'):
    c.model.name = 'transformer_xl'
    c.model.mem_len = c.data.seq_len
    c.data.order = 'contiguous'
  return c
