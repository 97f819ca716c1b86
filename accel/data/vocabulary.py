"""The token ids an encoder (BERT) sees: text ids and the special tokens PAD, CLS, SEP, MASK.

`Vocabulary.after_text(n)`: text ids [0, n) (bytes: n = 256; a corpus's own word ids), then
PAD, CLS, MASK, SEP at n .. n+3. A trained subword tokenizer (`accel.data.tokenization`) puts
its special tokens first ([PAD] [UNK] [CLS] [SEP] [MASK] = 0..4) and its text ids after.
`word_start[id]` (WordPiece: the id does not begin with '##') lets masking take whole words;
None: every text token is a unit of its own.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
  size: int                   # ids [0, size)
  text_start: int             # text ids [text_start, text_stop): maskable, random replacements
  text_stop: int
  pad: int
  cls: int
  sep: int
  mask: int
  word_start: np.ndarray | None = None     # bool [size]

  @classmethod
  def after_text(cls, num_text: int) -> 'Vocabulary':
    return cls(size=num_text + 4, text_start=0, text_stop=num_text, pad=num_text,
               cls=num_text + 1, mask=num_text + 2, sep=num_text + 3)


BYTE_VOCAB = 256
BYTES = Vocabulary.after_text(BYTE_VOCAB)     # PAD 256, CLS 257, MASK 258, SEP 259
