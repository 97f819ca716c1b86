"""GLUE (Wang et al. 2019) for fine-tuning an encoder (PLD, papers.md section 2): `glue/<task>`.

tfds's own `glue` builder (tensorflow_datasets.text.glue) is TensorFlow-free except for one
step (checked here with no TensorFlow installed): its examples are read with csv and epath
and its Text, ClassLabel and float32 features encode without TensorFlow, but it unpacks the
task zips with tfds's extractor, which imports TensorFlow. And `tfds.builder('glue/...')`
does not find it without TensorFlow (the catalogue is not imported then). So `Glue` imports
the class directly and changes only where the files come from: the archives from the tfds
manual dir first, else their URLs (`accel.data.downloads`: CoLA.zip, SST-2.zip, STS-B.zip,
QNLIv2.zip, RTE.zip; MRPC as msr_paraphrase_train.txt, msr_paraphrase_test.txt and
mrpc_dev_ids.tsv), unpacked with zipfile; a bad archive is a UserError.
Splits: train, validation (GLUE's dev set, where the papers' numbers come from), test
(unlabelled).

`TASKS`: each task's text fields (one sentence or a pair) and metrics, as GLUE reports them:
CoLA Matthews correlation, SST-2 / QNLI / RTE accuracy, MRPC F1 and accuracy, STS-B Pearson
and Spearman correlation of a regression on the 0-5 similarity score.

Encoding (`encode_pairs`): [CLS] a [SEP] (b [SEP]) in the encoder's vocabulary (bytes:
UTF-8 bytes), the longer part cut first until it fits seq_len, then PAD; as BERT's
run_classifier.py does.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import zipfile

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.text import glue as tfds_glue

from accel.data import downloads
from accel.data.vocabulary import Vocabulary
from accel.errors import UserError


@dataclasses.dataclass(frozen=True)
class GlueTask:
  fields: tuple                   # the text features, in input order
  metrics: tuple                  # the first one is the task's headline number
  regression: bool = False


TASKS = {
    'cola': GlueTask(('sentence',), ('matthews',)),
    'sst2': GlueTask(('sentence',), ('accuracy',)),
    'mrpc': GlueTask(('sentence1', 'sentence2'), ('f1', 'accuracy')),
    'stsb': GlueTask(('sentence1', 'sentence2'), ('pearson', 'spearman'), regression=True),
    'qnli': GlueTask(('question', 'sentence'), ('accuracy',)),
    'rte': GlueTask(('sentence1', 'sentence2'), ('accuracy',)),
}
NAMES = tuple(f'glue/{task}' for task in TASKS)
# tfds's MRPC URLs, and the names their files go by in the manual dir
MANUAL_NAMES = {tfds_glue._MRPC_DEV_IDS: 'mrpc_dev_ids.tsv'}  # pylint: disable=protected-access
READ_ERRORS = (OSError, KeyError, IndexError, ValueError, csv.Error, UnicodeDecodeError)


class _ManualFirst:
  """A download manager that takes an archive from the manual dir when it is there."""

  def __init__(self, dl_manager):
    self._dl = dl_manager

  def _fetch(self, url: str):
    return downloads.fetch(self._dl, url, MANUAL_NAMES.get(url))

  def download(self, urls):
    return ({k: self._fetch(u) for k, u in urls.items()} if isinstance(urls, dict)
            else self._fetch(urls))

  def download_and_extract(self, url: str):
    """The zip at `url`, extracted with zipfile (tfds's extractor needs TensorFlow) into
    <download_dir>/extracted/<archive name>/, renamed into place when complete."""
    path = self._fetch(url)
    target = os.path.join(os.fspath(self._dl.download_dir), 'extracted', path.name)
    if not os.path.isdir(target):
      partial = f'{target}.incomplete-{os.getpid()}'
      shutil.rmtree(partial, ignore_errors=True)
      try:
        with zipfile.ZipFile(path) as archive:
          archive.extractall(partial)
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise downloads.corrupt(path, e) from e
      os.replace(partial, target)
    return target


class Glue(tfds_glue.Glue, skip_registration=True):
  """tfds's GLUE, archives from the manual dir first (module docstring)."""
  name = 'glue'
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Optional: put the task\'s archive (see accel.data.glue) '
                                  'into the manual dir to avoid the download.')

  def _split_generators(self, dl_manager):
    return super()._split_generators(_ManualFirst(dl_manager))

  def _generate_examples(self, data_file, split, mrpc_files=None):
    try:
      yield from super()._generate_examples(data_file, split, mrpc_files)
    except READ_ERRORS as e:
      raise downloads.corrupt(data_file or mrpc_files, e) from e


def task_of(name: str) -> str:
  task = name.split('/', 1)[1] if name.startswith('glue/') else ''
  if task not in TASKS:
    raise UserError(f'unknown GLUE task {name!r}; known: {", ".join(NAMES)}')
  return task


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def encode_pairs(parts: list[list[int]], vocab: Vocabulary, seq_len: int) -> np.ndarray:
  """[CLS] a [SEP] (b [SEP]) PAD..., int32 [seq_len]; the longest part is cut first."""
  parts = [list(p) for p in parts]
  room = seq_len - 1 - len(parts)
  if room < len(parts):
    raise UserError(f'data.seq_len {seq_len} leaves no room for the text of a GLUE example')
  while sum(map(len, parts)) > room:
    longest = max(parts, key=len)
    longest.pop()
  ids = [vocab.cls] + [i for p in parts for i in p + [vocab.sep]]
  return np.asarray(ids + [vocab.pad] * (seq_len - len(ids)), np.int32)


def byte_ids(text: str) -> list[int]:
  return list(text.encode('utf-8'))


def dataset(source, task: str, vocab: Vocabulary, seq_len: int, to_ids=byte_ids,
            pad_to_multiple: int = 1) -> grain.MapDataset:
  """{'inputs': int32 [seq_len], 'label': int32 (float32 for STS-B), 'weight': 1.0} per
  example; with `pad_to_multiple`, examples of weight 0 fill the last batch (evaluation
  then covers every example of the split)."""
  spec = TASKS[task]
  inputs, labels = [], []
  for i in range(len(source)):
    record = source[i]
    inputs.append(encode_pairs([to_ids(_text(record[f])) for f in spec.fields], vocab,
                               seq_len))
    labels.append(record['label'])
  count = len(labels)
  padded = -(-count // pad_to_multiple) * pad_to_multiple
  inputs_NxL = np.stack(inputs + [inputs[0]] * (padded - count)) if count else \
      np.zeros((0, seq_len), np.int32)
  labels_N = np.asarray(labels + [labels[0] if labels else 0] * (padded - count),
                        np.float32 if spec.regression else np.int32)
  weights_N = (np.arange(padded) < count).astype(np.float32)
  return grain.MapDataset.range(padded).map(
      lambda i: {'inputs': inputs_NxL[i], 'label': labels_N[i], 'weight': weights_N[i]})


def collate(examples: list) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in ('inputs', 'label', 'weight')}


def builder_kwargs(name: str) -> dict:
  return {'config': task_of(name)}


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  label = builder.info.features['label']
  return label.num_classes if isinstance(label, tfds.features.ClassLabel) else 1
