"""GLUE (accel.data.glue, tfds's own builder without TensorFlow) on fakes in the canonical
formats, the encoding of pairs, each task's metric, and one tiny fine-tuning run."""
import io
import math
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from accel import glue_metrics, models, train
from accel.data import glue, input_pipeline, tokenization
from accel.data.vocabulary import BYTES
from accel.errors import UserError
from configs import pld_bert_finetune

PAIRS = [('A man is playing a guitar.', 'A person plays an instrument.'),
         ('The cat sleeps on the mat.', 'Stocks fell sharply on Monday.'),
         ('Rain is expected tomorrow.', 'It will probably rain tomorrow.'),
         ('She reads a book.', 'Nobody is reading anything at all today.'),
         ('Two dogs run in a park.', 'Dogs are running.')]
BINARY = [1, 0, 1, 0, 1]


def _tsv(rows):
  return ''.join('\t'.join(map(str, r)) + '\n' for r in rows)


def _zip(path, folder, files):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as z:
    for name, text in files.items():
      z.writestr(f'{folder}/{name}', text)
  path.write_bytes(buffer.getvalue())


def write_fake_glue(manual, task):
  """The task's canonical archive (or MRPC's three files); dev = the last 2 examples."""
  manual.mkdir(parents=True, exist_ok=True)
  a, b = zip(*PAIRS)
  if task == 'cola':
    rows = [('gj04', y, '' if y else '*', s) for s, y in zip(a, BINARY)]
    files = {'train.tsv': _tsv(rows[:3]), 'dev.tsv': _tsv(rows[3:]),
             'test.tsv': _tsv([('index', 'sentence'), (0, a[0])])}
    _zip(manual / 'CoLA.zip', 'CoLA', files)
  elif task == 'sst2':
    rows = [('sentence', 'label')] + list(zip(a, BINARY))
    files = {'train.tsv': _tsv(rows[:4]), 'dev.tsv': _tsv(rows[:1] + rows[4:]),
             'test.tsv': _tsv([('index', 'sentence'), (0, a[0])])}
    _zip(manual / 'SST-2.zip', 'SST-2', files)
  elif task == 'stsb':
    head = ('index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2',
            'sentence1', 'sentence2', 'score')
    rows = [(i, 'main-captions', 'MSRvid', '2012test', i, 'none', 'none', s, t, 5.0 - i)
            for i, (s, t) in enumerate(PAIRS)]
    files = {'train.tsv': _tsv([head] + rows[:3]), 'dev.tsv': _tsv([head] + rows[3:]),
             'test.tsv': _tsv([head[:-1], rows[0][:-1]])}
    _zip(manual / 'STS-B.zip', 'STS-B', files)
  elif task in ('qnli', 'rte'):
    classes = ('not_entailment', 'entailment')
    head = ('index', 'question', 'sentence', 'label') if task == 'qnli' else \
        ('index', 'sentence1', 'sentence2', 'label')
    rows = [(i, s, t, classes[y]) for i, (s, t), y in zip(range(5), PAIRS, BINARY)]
    files = {'train.tsv': _tsv([head] + rows[:3]), 'dev.tsv': _tsv([head] + rows[3:]),
             'test.tsv': _tsv([head[:-1], rows[0][:-1]])}
    if task == 'qnli':
      _zip(manual / 'QNLIv2.zip', 'QNLI', files)
    else:
      _zip(manual / 'RTE.zip', 'RTE', files)
  else:                                   # mrpc: the Microsoft files; dev by the id list
    head = ('Quality', '#1 ID', '#2 ID', '#1 String', '#2 String')
    rows = [(y, 100 + i, 200 + i, s, t) for i, (s, t), y in zip(range(5), PAIRS, BINARY)]
    (manual / 'msr_paraphrase_train.txt').write_text('\ufeff' + _tsv([head] + rows),
                                                      encoding='utf-8')
    (manual / 'msr_paraphrase_test.txt').write_text(_tsv([head] + rows[:1]), encoding='utf-8')
    (manual / 'mrpc_dev_ids.tsv').write_text(_tsv([(103, 203), (104, 204)]))


def _config(tmp_path, task, seq_len=48, batch=2):
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=batch, eval_batch_size=0, eval_steps=-1,
      data=dict(name=f'glue/{task}', path='', dir=str(tmp_path / 'tfds'), seq_len=seq_len,
                order='shuffled', tokenizer='', vocab_size=0, tokenizer_corpus='')))


@pytest.mark.parametrize('task', list(glue.TASKS))
def test_each_task_prepares_from_its_canonical_archive(tmp_path, task):
  write_fake_glue(tmp_path / 'tfds' / 'downloads' / 'manual', task)
  data = input_pipeline.build(_config(tmp_path, task, seq_len=96))    # nothing is cut
  spec = glue.TASKS[task]
  assert data.info.num_classes == (1 if spec.regression else 2)
  assert data.info.num_train_examples == 3
  (batch,) = data.eval_batches()                       # the 2 dev examples, in order
  np.testing.assert_array_equal(batch['weight'], [1.0, 1.0])
  first, second = PAIRS[3]
  texts = [first] if len(spec.fields) == 1 else [first, second]
  expected = [BYTES.cls] + [i for t in texts for i in list(t.encode()) + [BYTES.sep]]
  expected = tuple(expected + [BYTES.pad] * (96 - len(expected)))
  labels = dict(zip(map(tuple, batch['inputs'].tolist()), batch['label']))
  # STS-B's score; tfds's entailment classes are (entailment, not_entailment)
  want = {'stsb': 5.0 - 3, 'qnli': 1 - BINARY[3], 'rte': 1 - BINARY[3]}.get(task, BINARY[3])
  assert labels[expected] == pytest.approx(want)


def test_pairs_are_cut_longest_first_and_padded():
  ids = glue.encode_pairs([list(range(10)), list(range(100, 103))], BYTES, 12)
  # 12 = CLS + 6 + SEP + 3 + SEP: the longer part lost 4
  assert ids.tolist() == [BYTES.cls, 0, 1, 2, 3, 4, 5, BYTES.sep, 100, 101, 102, BYTES.sep]
  ids = glue.encode_pairs([[1, 2]], BYTES, 6)
  assert ids.tolist() == [BYTES.cls, 1, 2, BYTES.sep, BYTES.pad, BYTES.pad]


def test_evaluation_is_padded_to_whole_batches(tmp_path):
  write_fake_glue(tmp_path / 'tfds' / 'downloads' / 'manual', 'rte')
  config = _config(tmp_path, 'rte')
  config.eval_batch_size = 3
  (batch,) = input_pipeline.build(config).eval_batches()
  np.testing.assert_array_equal(batch['weight'], [1.0, 1.0, 0.0])


def test_truncated_archive_is_a_user_error(tmp_path):
  manual = tmp_path / 'tfds' / 'downloads' / 'manual'
  write_fake_glue(manual, 'rte')
  data = (manual / 'RTE.zip').read_bytes()
  (manual / 'RTE.zip').write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match='RTE.zip is truncated or corrupt'):
    input_pipeline.build(_config(tmp_path, 'rte'))


def test_metrics_against_their_formulas():
  rng = np.random.default_rng(0)
  label, prediction = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  tp = np.sum((prediction == 1) & (label == 1))
  tn = np.sum((prediction == 0) & (label == 0))
  fp = np.sum((prediction == 1) & (label == 0))
  fn = np.sum((prediction == 0) & (label == 1))
  m = glue_metrics.METRICS
  assert m['accuracy'](prediction, label) == pytest.approx((tp + tn) / 200)
  assert m['f1'](prediction, label) == pytest.approx(2 * tp / (2 * tp + fp + fn))
  assert m['matthews'](prediction, label) == pytest.approx(
      (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  x, y = rng.normal(size=50), rng.normal(size=50)
  assert m['pearson'](x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
  assert m['spearman'](x, y) == pytest.approx(np.corrcoef(stats.rankdata(x),
                                                          stats.rankdata(y))[0, 1])
  assert m['pearson'](np.ones(5), y[:5]) == 0.0


def test_padding_does_not_change_the_classifier():
  config = pld_bert_finetune.get_config('smoke')
  config.model.num_layers = 1
  info = input_pipeline.DatasetInfo('text_classification', num_classes=2)
  model = models.build_model(config, info)
  short = glue.encode_pairs([[5, 6, 7], [8, 9]], BYTES, 8)[None]
  long = glue.encode_pairs([[5, 6, 7], [8, 9]], BYTES, 16)[None]
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(long))
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(params, jnp.asarray(short[:, :8])),
                             apply(params, jnp.asarray(long)), rtol=1e-5, atol=1e-6)


def test_finetuning_on_stsb_reports_its_correlations(tmp_path):
  write_fake_glue(tmp_path / 'tfds' / 'downloads' / 'manual', 'stsb')
  config = pld_bert_finetune.get_config('smoke')
  config.data.name, config.data.dir = 'glue/stsb', str(tmp_path / 'tfds')
  config.total_steps, config.batch_size, config.eval_steps = 2, 2, -1
  config.model.num_layers = 1
  config.eval_every, config.progress_bar = 2, False
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert {'eval/pearson', 'eval/spearman', 'eval/loss'} <= set(summary)
  assert 'eval/accuracy' not in summary
  # two dev examples: any two distinct predictions correlate +-1 with the two scores
  assert abs(summary['eval/pearson']) == pytest.approx(1.0) and \
      abs(summary['eval/spearman']) == pytest.approx(1.0)


def test_a_subword_encoder_reads_glue_in_its_pretraining_tokenizer(tmp_path):
  write_fake_glue(tmp_path / 'tfds' / 'downloads' / 'manual', 'rte')
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'a.txt').write_text(' '.join(' '.join(p) for p in PAIRS) * 20)
  config = _config(tmp_path, 'rte', seq_len=64)
  config.data.update(dict(tokenizer='wordpiece', vocab_size=100, tokenizer_corpus='text',
                          path=str(tmp_path / 'corpus')))
  data = input_pipeline.build(config)
  vocab = data.info.vocab
  assert (vocab.pad, vocab.cls, vocab.sep) == (0, 2, 3) and data.info.vocab_size == vocab.size
  (folder,) = (tmp_path / 'tfds' / 'tokenizers').glob('user_text/*/*/wordpiece-100')
  tokenizer = tokenization.load(str(folder))
  first, second = PAIRS[3]
  ids = [vocab.cls, *tokenizer.encode(first, add_special_tokens=False).ids, vocab.sep,
         *tokenizer.encode(second, add_special_tokens=False).ids, vocab.sep]
  rows = data.eval_batches()[0]['inputs'].tolist()
  assert ids + [vocab.pad] * (64 - len(ids)) in rows
  config.data.tokenizer_corpus = ''
  with pytest.raises(UserError, match='tokenizer_corpus'):
    input_pipeline.build(config)
