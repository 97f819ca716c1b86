"""Where a builder's source archives come from: the tfds manual dir first, else the network.

A file of the archive's name in the manual dir (default `<data_dir>/downloads/manual/`, e.g.
~/.cache/accel/tfds/downloads/manual/enwik8.zip) is used as it is, for machines without a
network; otherwise the canonical URL is downloaded (and cached by tfds in
`<data_dir>/downloads/`). A failed download is a UserError that says where to put the file.
"""
from __future__ import annotations

import os
import pathlib

from accel.errors import UserError


def manual_path(dl_manager, filename: str) -> pathlib.Path | None:
  """The manual dir's `filename`, if the manual dir exists and holds it."""
  try:
    local = dl_manager.manual_dir / filename
  except AssertionError:          # no manual dir (or an empty one)
    return None
  return local if local.exists() else None


def default_manual_dir(dl_manager) -> str:
  return os.fspath(dl_manager.download_dir / 'manual')


def fetch(dl_manager, url: str, filename: str | None = None) -> pathlib.Path:
  """The archive at `url`: the manual dir's `filename` (default: the URL's last part) if
  there, else downloaded."""
  filename = filename or url.rsplit('/', 1)[1]
  local = manual_path(dl_manager, filename)
  if local is not None:
    return local
  try:
    return pathlib.Path(dl_manager.download(url))
  except Exception as e:  # pylint: disable=broad-except (network errors come in many types)
    raise UserError(f'could not download {url} ({type(e).__name__}); without a network put '
                    f'{filename} into the tfds manual dir (default '
                    f'{default_manual_dir(dl_manager)})') from e


def corrupt(path, error: Exception) -> UserError:
  """The error for an archive that is truncated or not what it should be."""
  where = ('it came from the manual dir: replace it' if '/manual/' in os.fspath(path) else
           'it was downloaded: delete it so that it is downloaded again')
  return UserError(f'{path} is truncated or corrupt ({type(error).__name__}: {error}); '
                   f'{where}. Nothing was prepared from it')
