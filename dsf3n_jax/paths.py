"""Paths of a run's files, local or in a bucket (``etils.epath``), and writing them whole."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


# What atomic_file's temporary files match (one a kill interrupted stays behind).
TEMPORARY_GLOB = ".*.tmp*"


def atomic_file(path, write: Callable[[Any], None], *, mode: str = "wb") -> None:
  """``write(f)`` into a temporary file beside ``path``, then renamed over ``path``: the file
  is always one whole version, the earlier one if ``write`` fails (its temporary file is
  removed). The temporary name is unique to the call (process id and a random token), so
  two writers of one file never rename each other's half-written file."""
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
  """Writes ``text`` to ``path`` whole or not at all (``atomic_file``): the last of two
  writers' renames wins."""
  atomic_file(path, lambda f: f.write(text), mode="w")


def atomic_savez(path, arrays: Mapping[str, Any]) -> str:
  """``np.savez(path, **arrays)``, written whole or not at all (``atomic_file``).

  Like ``np.savez``, adds ``.npz`` to a ``path`` without it. Returns the path written.
  """
  path = os.fspath(path)
  if not path.endswith(".npz"):
    path += ".npz"
  atomic_file(path, lambda f: np.savez(f, **arrays))
  return path


def resolve(workdir) -> epath.Path:
  """``workdir`` as an ``epath.Path``; a local one made absolute (orbax needs that), a leading
  ``~`` the home folder (a shell leaves ``--workdir=~/run`` as it is). An empty
  path (an unset variable: ``--workdir=$WORKDIR``) is refused, not read as the current
  directory."""
  text = os.fspath(workdir)
  if not text.strip():
    raise ValueError(f"workdir: an empty path ({text!r}; an unset variable?): expected a "
                     "directory")
  return epath.Path(text if not is_local(text) else os.path.abspath(os.path.expanduser(text)))


def publish_folder(target: pathlib.Path, fill: Callable[[pathlib.Path], Any]) -> Any:
  """``fill(tmp)`` writes a folder beside ``target`` that is then renamed into its place (an
  existing ``target`` is replaced): a process killed meanwhile leaves the old ``target`` (or
  none) and a stale ``tmp``, which the next call removes. Returns what ``fill`` returns."""
  tmp = target.parent / f".{target.name}.tmp"
  if tmp.exists():
    shutil.rmtree(tmp)
  out = fill(tmp)
  if target.exists():
    shutil.rmtree(target)
  tmp.rename(target)
  return out
