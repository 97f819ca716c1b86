"""Subword (and word) tokenizers trained offline on a corpus's train split (HF `tokenizers`).

`data.tokenizer` (with `data.vocab_size`):
  '' | 'bytes'  the corpus's own units: bytes (WikiText-103: its own word vocabulary)
  'bpe'         byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level alphabet): lossless
  'wordpiece'   WordPiece (BERT's: BERT pre-tokenization, '##' continuation pieces, case
                kept); whitespace is not kept
  'words'       whitespace-separated words, ids by frequency (most frequent first, as the
                adaptive softmax wants), out-of-vocabulary words -> [UNK]; line breaks are
                not kept
Every trained vocabulary starts with the special tokens [PAD] [UNK] [CLS] [SEP] [MASK]
(ids 0..4); the text ids follow (`vocabulary`).

Trained once per (corpus, kind, vocabulary size) on the train split's text (UTF-8; invalid
bytes become U+FFFD) and saved beside the prepared data in
  <data_dir>/tokenizers/<corpus: builder name/config/version>/<kind>-<vocab_size>/
as tokenizer.json, the token ids of each split (<split>.npy, int32) and info.json (bytes and
tokens per split). The folder is written under another name and renamed into place when
complete, under a file lock; a folder whose info.json is missing or whose arrays do not
have the recorded lengths is made again.

Bits per byte: for a lossless tokenization (bytes, byte-level BPE) bits/byte =
(bits/token) / (bytes/token), with the split's own ratio (`Tokenized.bytes_per_token`);
exact for a loss averaged over the whole split, the split's average ratio for a part of it.
WordPiece and word vocabularies drop whitespace (and map rare words to [UNK]), so the
token sequence does not determine the bytes: no bits per byte for them (perplexity only).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil

import numpy as np

from accel.data.vocabulary import Vocabulary
from accel.errors import UserError

KINDS = ('bpe', 'wordpiece', 'words')
LOSSLESS = ('bpe',)
SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
INFO_FILE = 'info.json'


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenized:
  ids: dict                      # split -> int32 array
  vocabulary: Vocabulary
  bytes_per_token: dict          # split -> float
  lossless: bool
  folder: str


def _require_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError('data.tokenizer needs the `tokenizers` package: '
                    'pip install -r requirements.txt') from e
  return tokenizers


def new_tokenizer(kind: str, vocab_size: int):
  """An untrained HF tokenizer of `kind` and its trainer."""
  tk = _require_tokenizers()
  common = dict(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
  if kind == 'bpe':
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), **common)
  elif kind == 'wordpiece':
    tokenizer = tk.Tokenizer(tk.models.WordPiece(unk_token='[UNK]'))
    tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tk.decoders.WordPiece()
    trainer = tk.trainers.WordPieceTrainer(**common)
  elif kind == 'words':
    tokenizer = tk.Tokenizer(tk.models.WordLevel(unk_token='[UNK]'))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    trainer = tk.trainers.WordLevelTrainer(**common)
  else:
    raise UserError(f'unknown data.tokenizer {kind!r}; known: bytes, {", ".join(KINDS)}')
  return tokenizer, trainer


def _lines(data: np.ndarray) -> list[str]:
  return data.tobytes().decode('utf-8', errors='replace').splitlines(keepends=True)


def encode(tokenizer, data: np.ndarray) -> np.ndarray:
  """The token ids of UTF-8 bytes, line by line (lines keep their line break)."""
  encodings = tokenizer.encode_batch(_lines(data), add_special_tokens=False)
  return np.fromiter((i for e in encodings for i in e.ids), np.int32)


def vocabulary(tokenizer, kind: str) -> Vocabulary:
  ids = {token: tokenizer.token_to_id(token) for token in SPECIALS}
  if sorted(ids.values()) != list(range(len(SPECIALS))):
    raise UserError(f'the tokenizer does not start with the special tokens {SPECIALS}')
  size = tokenizer.get_vocab_size()
  word_start = None
  if kind == 'wordpiece':
    word_start = np.ones(size, bool)
    for token, i in tokenizer.get_vocab().items():
      word_start[i] = not token.startswith('##')
  return Vocabulary(size=size, text_start=len(SPECIALS), text_stop=size, pad=ids['[PAD]'],
                    cls=ids['[CLS]'], sep=ids['[SEP]'], mask=ids['[MASK]'],
                    word_start=word_start)


def load(folder: str):
  """The trained tokenizer saved in `folder`."""
  return _require_tokenizers().Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))


def _complete(folder: str, splits) -> dict | None:
  """info.json of a complete folder, else None."""
  try:
    with open(os.path.join(folder, INFO_FILE)) as f:
      info = json.load(f)
    for split in splits:
      ids = np.load(os.path.join(folder, f'{split}.npy'), mmap_mode='r')
      if len(ids) != info['tokens'][split]:
        return None
  except (OSError, ValueError, KeyError):
    return None
  return info


def _train_and_write(kind: str, vocab_size: int, splits: dict, folder: str) -> None:
  tokenizer, trainer = new_tokenizer(kind, vocab_size)
  tokenizer.train_from_iterator(_lines(splits['train']), trainer=trainer)
  partial = f'{folder}.incomplete-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  tokenizer.save(os.path.join(partial, 'tokenizer.json'))
  info = {'kind': kind, 'vocab_size': tokenizer.get_vocab_size(), 'bytes': {}, 'tokens': {}}
  for split, data in splits.items():
    ids = encode(tokenizer, data)
    np.save(os.path.join(partial, f'{split}.npy'), ids)
    info['bytes'][split], info['tokens'][split] = int(len(data)), int(len(ids))
  with open(os.path.join(partial, INFO_FILE), 'w') as f:
    json.dump(info, f, indent=1)
  shutil.rmtree(folder, ignore_errors=True)     # an incomplete one (`_complete` said so)
  os.rename(partial, folder)


def tokenized(kind: str, vocab_size: int, corpus: str, data_dir: str,
              splits: dict[str, np.ndarray]) -> Tokenized:
  """`splits` (uint8 text) in the tokenizer of (corpus, kind, vocab_size), trained on
  splits['train'] the first time (module docstring)."""
  if kind not in KINDS:
    raise UserError(f'unknown data.tokenizer {kind!r}; known: bytes, {", ".join(KINDS)}')
  if vocab_size <= len(SPECIALS) + (256 if kind == 'bpe' else 0):
    raise UserError(f'data.vocab_size {vocab_size} is too small for data.tokenizer={kind} '
                    f'({len(SPECIALS)} special tokens' +
                    (' and the 256 byte tokens)' if kind == 'bpe' else ')'))
  folder = os.path.join(data_dir, 'tokenizers', corpus, f'{kind}-{vocab_size}')
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  with open(folder + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    info = _complete(folder, splits)
    if info is None:
      _train_and_write(kind, vocab_size, splits, folder)
      info = _complete(folder, splits)
  tokenizer = load(folder)
  return Tokenized(
      ids={split: np.load(os.path.join(folder, f'{split}.npy')) for split in splits},
      vocabulary=vocabulary(tokenizer, kind),
      bytes_per_token={s: info['bytes'][s] / max(info['tokens'][s], 1) for s in splits},
      lossless=kind in LOSSLESS, folder=folder)
