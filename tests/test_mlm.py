"""Tests of accel.mlm (masking proportions, selected-only loss) and BERT fine-tuning."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from accel import mlm, models, train
from accel.data import builders, genre, input_pipeline
from configs import pld_bert, pld_bert_finetune


mask_tokens = jax.jit(mlm.mask_tokens, static_argnums=2)   # one compile per shape


def _bytes(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, mlm.BYTES.text_stop)


def test_masking_proportions():
  tokens = mlm.with_cls(_bytes((256, 127)))                     # 256 rows of 128 tokens
  tokens = tokens.at[:, -7:].set(mlm.BYTES.pad)                    # padded tail: 120 maskable
  inputs, targets, weights = map(np.asarray, mask_tokens(jax.random.key(1), tokens, mlm.BYTES))
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(targets, tokens)
  # Exactly round(0.15 * 120) = 18 selected per row, never CLS or PAD.
  np.testing.assert_array_equal(weights.sum(1), 18)
  assert weights[:, 0].sum() == 0 and weights[:, -7:].sum() == 0
  # Unselected positions are untouched.
  np.testing.assert_array_equal(inputs[weights == 0], tokens[weights == 0])
  sel_in, sel_tok = inputs[weights == 1], tokens[weights == 1]
  n = sel_in.size                                                # 4608 selected tokens
  masked = (sel_in == mlm.BYTES.mask).mean()
  changed = ((sel_in != mlm.BYTES.mask) & (sel_in != sel_tok)).mean()
  kept = (sel_in == sel_tok).mean()
  assert np.all(sel_in[sel_in != mlm.BYTES.mask] < mlm.BYTES.text_stop)   # random tokens are bytes
  # Expected: 0.8 masked; 0.1 random, of which 1/256 equal the original; so 0.1 * 255/256
  # changed and 0.1 + 0.1/256 unchanged. Binomial bounds of 4 sigma.
  for got, want in [(masked, 0.8), (changed, 0.1 * 255 / 256), (kept, 0.1 + 0.1 / 256)]:
    assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n), (got, want)


def test_masking_is_a_function_of_the_key():
  tokens = mlm.with_cls(_bytes((4, 31)))
  a = mask_tokens(jax.random.key(3), tokens, mlm.BYTES)
  b = mask_tokens(jax.random.key(3), tokens, mlm.BYTES)
  c = mask_tokens(jax.random.key(4), tokens, mlm.BYTES)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[2], c[2])


def test_loss_counts_only_selected_positions():
  targets = _bytes((2, 8))
  weights = jnp.zeros((2, 8)).at[0, 3].set(1.0).at[1, 5].set(1.0)
  logits = jax.random.normal(jax.random.key(2), (2, 8, mlm.BYTES.size))
  loss, accuracy = mlm.mlm_loss(logits, targets, weights)
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 3, targets[0, 3]] + logp[1, 5, targets[1, 5]]) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  # Changing the logits at unselected positions changes nothing.
  other = logits.at[:, :3].set(100.0)
  np.testing.assert_allclose(mlm.mlm_loss(other, targets, weights)[0], loss, rtol=1e-6)
  # A perfect prediction at the selected positions: accuracy 1.
  perfect = logits.at[0, 3, targets[0, 3]].set(1e3).at[1, 5, targets[1, 5]].set(1e3)
  assert float(mlm.mlm_loss(perfect, targets, weights)[1]) == 1.0


def _bert_config(module, **overrides):
  config = module.get_config('smoke')
  config.progress_bar = False
  config.model.num_layers = 2          # the smoke model's other sizes; two layers are enough
  config.update_from_flattened_dict(overrides)
  return config


def _checkpoint_params(workdir):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())['params']


def test_finetuning_run_restores_the_pretrained_encoder(tmp_path):
  pre_dir, ft_dir = str(tmp_path / 'pre'), str(tmp_path / 'ft')
  # (layer dropping compiles a program per gate pattern; this test is about the encoder)
  summary = train.train_and_evaluate(
      _bert_config(pld_bert, total_steps=4, **{'layerdrop.enabled': False}), pre_dir)
  assert 0 < summary['eval/accuracy'] <= 1
  # lr 0: the one fine-tuning step leaves the encoder exactly as it was loaded.
  ft = dict(total_steps=1, **{'optimizer.lr': 0.0})
  train.train_and_evaluate(
      _bert_config(pld_bert_finetune, **ft, **{'finetune.pretrained_workdir': pre_dir}), ft_dir)
  pretrained, tuned = map(_checkpoint_params, (pre_dir, ft_dir))
  assert set(tuned) == {'encoder', 'pooler', 'classifier'}
  jax.tree.map(np.testing.assert_array_equal, tuned['encoder'], pretrained['encoder'])
  # ... and not as a fresh initialisation (same seed) would have it.
  config = _bert_config(pld_bert_finetune)
  info = input_pipeline.DatasetInfo('text_classification', vocab_size=256, num_classes=3)
  fresh = models.build_model(config, info).init(
      jax.random.fold_in(jax.random.key(config.seed), 0),
      jnp.zeros((1, config.data.seq_len), jnp.int32))['params']
  assert not np.array_equal(fresh['encoder']['token_embed']['embedding'],
                            tuned['encoder']['token_embed']['embedding'])


def test_genre_passages_come_from_held_out_plays_of_their_genre(data_dir):
  config = _bert_config(pld_bert_finetune)
  data = input_pipeline.build(config)
  assert data.info.kind == 'text_classification' and data.info.num_classes == 3
  plays = {play: (folder, path.read_bytes()) for folder, play, path in builders.shakespeare_plays()
           if folder in genre.FOLIO_GENRE}
  held_out = genre.held_out_plays({p: genre.FOLIO_GENRE[f] for p, (f, _) in plays.items()})
  assert sorted(held_out) == ['henry-v', 'henry-viii', 'julius-caesar',
                              'much-ado-about-nothing', 'romeo-and-juliet',
                              'two-gentlemen-of-verona']

  def source_plays(batch):
    found = []
    for row, label in zip(batch['inputs'], batch['label']):
      passage = bytes(row.astype(np.uint8).tolist())
      (play,) = [p for p, (_, text) in plays.items() if passage in text]
      assert genre.FOLIO_GENRE[plays[play][0]] == label
      found.append(play)
    return found
  val_plays = source_plays(data.eval_batches()[0])
  train_plays = source_plays(data.train(0))
  assert set(val_plays) <= held_out and not set(train_plays) & held_out
  assert len(set(data.eval_batches()[0]['label'].tolist())) > 1   # validation order mixes genres
