r"""Prepares datasets ahead of training (each is otherwise prepared by its first run).

  python -m experiments.prepare mnist cifar10 enwik8 text8 wikitext103 \
      glue/cola glue/sst2 glue/mrpc glue/stsb glue/qnli glue/rte [--data_dir DIR]

Each name is a data.name (accel/data/input_pipeline.py); the archives are downloaded from
their canonical URLs, or taken from DIR/downloads/manual/ when there (DIR: --data_dir, else
$ACCEL_DATA_DIR, else ~/.cache/accel/tfds). Prints each dataset's folder and split sizes;
a bad archive or a failed download is one `error:` line and exit status 1.
"""
from __future__ import annotations

import argparse
import sys

import ml_collections

from accel.errors import UserError


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('names', nargs='+', help='data.name values')
  parser.add_argument('--data_dir', default='', help='prepared datasets (data.dir)')
  args = parser.parse_args(argv)
  from accel.data import input_pipeline  # pylint: disable=g-import-not-at-top (after argparse)
  for name in args.names:
    try:
      builder = input_pipeline.prepared(name, ml_collections.ConfigDict(
          dict(name=name, dir=args.data_dir, path='')))
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
    sizes = ', '.join(f'{split} {info.num_examples}' for split, info in
                      builder.info.splits.items())
    print(f'{name}: {builder.data_dir} ({sizes} records)')


if __name__ == '__main__':
  main()
