"""Paths of a run's files, local or in a bucket (``etils.epath``), and writing them whole."""

from __future__ import annotations

import contextlib
import os
import secrets

from etils import epath


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def atomic_write(path: epath.Path, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``.

  The temporary name is unique to this call (process id and a random token), so two
  writers of one file never rename each other's half-written file: the last rename wins,
  and the file is always one whole version.
  """
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}"
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    with contextlib.suppress(AttributeError, OSError, ValueError):  # remote files have no fd
      os.fsync(f.fileno())
  tmp.replace(path)


def resolve(workdir) -> epath.Path:
  """``workdir`` as an ``epath.Path``; a local one made absolute (orbax needs that)."""
  text = os.fspath(workdir)
  return epath.Path(text if not is_local(text) else os.path.abspath(text))
