"""Paths of a run's files, local or in a bucket (``etils.epath``), and writing them whole."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def _atomic(path, mode: str, write: Callable[[Any], None]) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}"
  try:
    with tmp.open(mode) as f:
      write(f)
      f.flush()
      with contextlib.suppress(AttributeError, OSError, ValueError):  # remote files have no fd
        os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def atomic_write(path: epath.Path, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``.

  The temporary name is unique to this call (process id and a random token), so two
  writers of one file never rename each other's half-written file: the last rename wins,
  and the file is always one whole version. A write that fails leaves ``path`` as it was
  and removes its temporary file.
  """
  _atomic(path, "w", lambda f: f.write(text))


def atomic_savez(path, arrays: Mapping[str, Any]) -> str:
  """``np.savez(path, **arrays)``, written whole or not at all (as ``atomic_write``).

  Like ``np.savez``, adds ``.npz`` to a ``path`` without it. Returns the path written.
  """
  path = os.fspath(path)
  if not path.endswith(".npz"):
    path += ".npz"
  _atomic(path, "wb", lambda f: np.savez(f, **arrays))
  return path


def resolve(workdir) -> epath.Path:
  """``workdir`` as an ``epath.Path``; a local one made absolute (orbax needs that)."""
  text = os.fspath(workdir)
  return epath.Path(text if not is_local(text) else os.path.abspath(text))
