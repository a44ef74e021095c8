"""Reading the project's files: paired features (.h5 / .npz) and every other ``.npz``.

``open_npz`` / ``read_npz`` read every ``.npz`` of the project (features,
embeddings, variables, converted weights) with ``allow_pickle=False``: a file
that is not an archive of arrays, or holds a pickled object array, is refused
with one line naming the file and what it should be. The checks of the
arrays read are ``dsf3n_jax.datasets.validation``'s.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable, Iterator

import numpy as np

SPLITS = ("train", "test")


def split_keys(split: str) -> dict[str, str]:
  """The key of each field of a split: the authors' HDF5 layout (``visual_<split>``, ...)."""
  return {"visual": f"visual_{split}", "audio": f"audio_{split}", "label": f"lab_{split}"}


KEYS = {split: split_keys(split) for split in SPLITS}
ALL_KEYS = tuple(k for split in SPLITS for k in KEYS[split].values())
SUFFIXES = (".h5", ".hdf5", ".npz")


class DataValidationError(ValueError):
  """A data file or array does not have the expected content.

  ``details``: text that the command lines print after the error line as it is, not as
  errors (``cli.report``), e.g. how to get a missing file; not part of ``str(error)``.
  """

  def __init__(self, *args, details: str | None = None):
    super().__init__(*args)
    self.details = details


NPZ_EXPECTED = "an .npz of arrays (np.savez)"
PAIRED_EXPECTED = ("an .npz of arrays (np.savez) with visual_<split>, audio_<split> and "
                   "lab_<split>, or an .h5/.hdf5 file")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def file_kind(path: str | os.PathLike) -> str:
  """What a file's first bytes say it is.

  Returns:
    "zip" (an .npz, or any zip archive), "npy" (one ``np.save`` array),
    "hdf5", "pickle" (protocol 2 or later), "empty" or "unknown".
  """
  with open(path, "rb") as f:
    head = f.read(8)
  if not head:
    return "empty"
  if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    return "zip"
  if head.startswith(b"\x93NUMPY"):
    return "npy"
  if head.startswith(_HDF5_MAGIC):
    return "hdf5"
  if head[0] == 0x80 and 2 <= head[1] <= 5:
    return "pickle"
  return "unknown"


def _not_npz_reason(path: str, kind: str, expected: str) -> str:
  h5_ok = ".h5" in expected and path.lower().endswith(".npz")
  return {
      "empty": "the file is empty",
      "npy": "it is a single .npy array (np.save), not an .npz archive",
      "hdf5": ("it is an HDF5 file, not an .npz archive"
               + (" (name it .h5 to read it as HDF5)" if h5_ok else "")),
      "pickle": "it is a Python pickle, which is never loaded (it could run code)",
  }.get(kind, "unreadable as an .npz: it is not a zip archive")


class NpzArrays:
  """An open ``.npz`` of arrays (``open_npz``): ``files``, ``in``, ``[key]``; no pickles."""

  def __init__(self, npz, path: str, expected: str):
    self._npz, self._path, self._expected = npz, path, expected
    self.files = list(npz.files)

  def __contains__(self, key) -> bool:
    return key in self.files

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self.files:
      raise KeyError(key)
    try:
      return self._npz[key]
    except ValueError as e:
      if "pickle" in str(e):  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise DataValidationError(
            f"{self._path}: key {key!r} holds Python objects (a pickled object array), which "
            f"are never loaded; expected {self._expected}") from e
      raise DataValidationError(f"{self._path}: key {key!r} is not a readable array ({e}); "
                                f"expected {self._expected}") from e
    except Exception as e:  # zipfile/zlib/numpy raise many types for a damaged member
      raise DataValidationError(
          f"{self._path}: key {key!r} is unreadable or truncated ({type(e).__name__}: {e}); "
          f"expected {self._expected}") from e


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, *,
             expected: str = NPZ_EXPECTED) -> Iterator[NpzArrays]:
  """``with open_npz(path) as f:`` an ``.npz`` of arrays, refusing anything else.

  Loads with ``allow_pickle=False``, and a file that is not an archive of
  ``.npy`` arrays (a pickle, an HDF5 file, a single ``.npy``, a torch ``.pth``,
  random bytes), is truncated, or holds a pickled object array under a key
  that is read, is a ``DataValidationError`` naming the file and ``expected``.

  Args:
    path: the file.
    expected: what the file should be, for the message (starts "an .npz of arrays").
  """
  path = os.fspath(path)

  def fail(reason: str, cause: BaseException | None = None):
    raise DataValidationError(f"{path}: {reason}; expected {expected}") from cause

  if not os.path.exists(path):
    fail("file not found")
  if os.path.isdir(path):
    fail("a directory, not a file")
  kind = file_kind(path)
  if kind != "zip":
    fail(_not_npz_reason(path, kind, expected))
  try:
    with zipfile.ZipFile(path) as z:
      other = [n for n in z.namelist() if not n.endswith(".npy")]
    npz = np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - zipfile raises many types for a damaged archive
    fail(f"unreadable or truncated .npz archive ({type(e).__name__}: {e})", e)
  with npz:
    if other:
      fail(f"a zip archive whose members are not .npy arrays ({other[:3]}"
           f"{' ...' if len(other) > 3 else ''})")
    yield NpzArrays(npz, path, expected)


def read_npz(path: str | os.PathLike, keys: Iterable[str] | None = None, *,
             expected: str = NPZ_EXPECTED) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` (those of ``keys`` that it has; None: all), via ``open_npz``."""
  with open_npz(path, expected=expected) as f:
    return {k: np.asarray(f[k]) for k in _wanted(f.files, keys)}


def _wanted(files: list[str], keys: Iterable[str] | None) -> Iterator[str]:
  return iter(files) if keys is None else (k for k in keys if k in files)


def read_paired_file(path: str | os.PathLike,
                     keys: Iterable[str] = ALL_KEYS) -> dict[str, np.ndarray]:
  """Reads the six paired-feature arrays (or other ``keys``) from an HDF5 or NPZ file.

  Only ``keys`` are read (by default the six: ``visual_train``,
  ``audio_train``, ``lab_train``, ``visual_test``, ``audio_test``,
  ``lab_test``); other keys are ignored. Missing keys are reported by
  ``validate_arrays`` (or ``read_split``).

  Args:
    path: a ``.h5``/``.hdf5`` or ``.npz`` file.
    keys: the keys to read.

  Returns:
    Dict from key to numpy array, for those of ``keys`` present in the file.

  Raises:
    DataValidationError: the file is missing, of an unknown type, unreadable or
      truncated.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataValidationError(f"{path}: file not found (expected an .h5 or .npz feature file)")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise DataValidationError(
        f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
  try:
    if suffix == ".npz":
      return read_npz(path, keys, expected=PAIRED_EXPECTED)
    return _read_h5(path, keys)
  except DataValidationError:
    raise
  except Exception as e:  # h5py/zipfile/numpy raise many types for bad files.
    kind = file_kind(path)
    hint = "" if kind in ("hdf5", "unknown") else f"; {_not_h5_reason(kind)}"
    raise DataValidationError(
        f"{path}: unreadable or truncated {suffix} file ({type(e).__name__}: {e}){hint}; "
        f"expected {PAIRED_EXPECTED}") from e


def _not_h5_reason(kind: str) -> str:
  return {"zip": "it is a zip archive (an .npz?), not HDF5: name it .npz",
          "empty": "the file is empty"}.get(kind, f"it is a {kind} file, not HDF5")


def _read_h5(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  import h5py  # Only needed for HDF5 inputs.

  out = {}
  with h5py.File(path, "r") as f:
    for k in keys:
      if k in f:
        if not isinstance(f[k], h5py.Dataset):
          raise DataValidationError(f"{path}: key {k!r} is a group, expected a dataset (array)")
        out[k] = np.asarray(f[k][()])
  return out


def file_keys(path: str | os.PathLike) -> list[str]:
  """Every key of a readable paired-feature file (for messages)."""
  if os.fspath(path).lower().endswith(".npz"):
    with open_npz(path, expected=PAIRED_EXPECTED) as f:
      return list(f.files)
  import h5py

  with h5py.File(path, "r") as f:
    return list(f.keys())


def peek_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """Returns the shapes of the six arrays without loading them (when possible).

  Args:
    path: a ``.h5`` or ``.npz`` file.

  Returns:
    Dict from key to shape for the keys present.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  try:
    if suffix in (".h5", ".hdf5"):
      import h5py

      with h5py.File(path, "r") as f:
        return {k: tuple(f[k].shape) for k in ALL_KEYS if k in f}
  except Exception:  # Fall back to the full read, which reports the error well.
    pass
  return {k: v.shape for k, v in read_paired_file(path).items()}
