"""Paths of a run's files, local or in a bucket (``etils.epath``), and writing them whole."""

from __future__ import annotations

import contextlib
import os

from etils import epath


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def atomic_write(path: epath.Path, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
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
