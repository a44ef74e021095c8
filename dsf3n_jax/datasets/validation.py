"""Reading paired-feature files (.h5 / .npz) and validating their six arrays.

Every check raises ``DataValidationError`` with a message naming the file, the
key, what was expected and what was found, so that nothing a file gets wrong
reaches training silently.

``open_npz`` / ``read_npz`` read every ``.npz`` of the project (features,
embeddings, variables, converted weights) with ``allow_pickle=False``: a file
that is not an archive of arrays, or holds a pickled object array, is refused
with one line naming the file and what it should be.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

SPLITS = ("train", "test")
# key name per (split, field); the authors' HDF5 layout.
KEYS = {
    split: {"visual": f"visual_{split}", "audio": f"audio_{split}", "label": f"lab_{split}"}
    for split in SPLITS
}
ALL_KEYS = tuple(k for split in SPLITS for k in KEYS[split].values())
SUFFIXES = (".h5", ".hdf5", ".npz")


class DataValidationError(ValueError):
  """A data file or array does not have the expected content."""


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
  """Reads the six SPEC arrays (or other ``keys``) from an HDF5 or NPZ file.

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


def read_split(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One split of a paired-feature file, checked: ``(visual, audio, labels)``.

  Reads ``visual_<split>``, ``audio_<split>`` and ``lab_<split>`` (any suffix
  the file has, e.g. "val") through ``read_paired_file`` and checks them as
  ``validate_arrays`` checks a split: rank-2 finite features, class ids or
  one-hot labels (a bad one names its key and row), equal counts.

  Returns:
    Features float32, labels int64 class ids.

  Raises:
    KeyError: a key of the split is not in the file (the message lists those
      that are).
    DataValidationError: the file or an array is not as expected.
  """
  keys = {"visual": f"visual_{split}", "audio": f"audio_{split}", "label": f"lab_{split}"}
  arrays = read_paired_file(path, keys.values())
  if len(arrays) < len(keys):
    found = sorted(_file_keys(path))
    raise KeyError(f"{os.fspath(path)}: missing {[k for k in keys.values() if k not in arrays]} "
                   f"for split {split!r}; found {found}")
  source = os.fspath(path)
  out = [_features(arrays[keys[f]], source=source, key=keys[f], field=f, dim=None)
         for f in ("visual", "audio")]
  out.append(labels_to_ids(arrays[keys["label"]], source=source, key=keys["label"]))
  counts = {k: len(a) for k, a in zip(keys.values(), out, strict=True)}
  if len(set(counts.values())) != 1:
    raise DataValidationError(
        f"{source}: split {split!r} example counts differ: {counts}; expected equal counts")
  return out[0], out[1], out[2].astype(np.int64)


def _file_keys(path: str | os.PathLike) -> list[str]:
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


def _check_finite(x: np.ndarray, *, source: str, key: str) -> None:
  bad = ~np.isfinite(x)
  if bad.any():
    rows = np.nonzero(bad.reshape(len(x), -1).any(axis=1))[0]
    raise DataValidationError(
        f"{source}: key {key!r} has {int(bad.sum())} non-finite values (NaN or +-Inf) in "
        f"{len(rows)} rows; first bad row {int(rows[0])}; expected all finite")


def _labels_to_ids(lab: np.ndarray, *, source: str, key: str,
                   num_classes: int | None) -> np.ndarray:
  """Integer ids from integer ids or one-hot rows (checked)."""
  if lab.ndim == 2:
    if num_classes is not None and lab.shape[1] != num_classes:
      raise DataValidationError(
          f"{source}: key {key!r} one-hot width {lab.shape[1]}, expected {num_classes} classes")
    if not np.all(np.isfinite(lab)):
      _check_finite(lab.astype(np.float64), source=source, key=key)
    is01 = (lab == 0) | (lab == 1)
    row_ok = is01.all(axis=1) & (lab.sum(axis=1) == 1)
    if not row_ok.all():
      first = int(np.nonzero(~row_ok)[0][0])
      raise DataValidationError(
          f"{source}: key {key!r} row {first} is not one-hot (found {lab[first][:20].tolist()}"
          f"{'...' if lab.shape[1] > 20 else ''}); {int((~row_ok).sum())} bad rows; expected "
          "exactly one 1 and zeros elsewhere")
    return np.argmax(lab, axis=1).astype(np.int32)
  if lab.ndim != 1:
    raise DataValidationError(
        f"{source}: key {key!r} has rank {lab.ndim} (shape {lab.shape}); expected rank 1 "
        "(class ids) or rank 2 (one-hot rows)")
  if np.issubdtype(lab.dtype, np.floating):
    if not np.all(np.isfinite(lab)):
      _check_finite(lab, source=source, key=key)
    if not np.all(lab == np.round(lab)):
      first = int(np.nonzero(lab != np.round(lab))[0][0])
      raise DataValidationError(
          f"{source}: key {key!r} row {first} label {lab[first].item()!r} is not an integer "
          "class id")
  elif not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
    raise DataValidationError(
        f"{source}: key {key!r} has dtype {lab.dtype}; expected integer class ids or one-hot rows")
  ids = lab.astype(np.int64)
  hi = num_classes - 1 if num_classes is not None else None
  bad = ids < 0 if hi is None else (ids < 0) | (ids > hi)
  if bad.any():
    first = int(np.nonzero(bad)[0][0])
    expected = f"0..{hi}" if hi is not None else "0.. (class ids are >= 0)"
    raise DataValidationError(
        f"{source}: key {key!r} row {first} has label {int(ids[first])}, outside {expected} "
        f"(rows with such labels: {int(bad.sum())})")
  return ids.astype(np.int32)


def labels_to_ids(lab, *, source: str, key: str,
                  num_classes: int | None = None) -> np.ndarray:
  """Checked int32 class ids from class ids or one-hot rows (``lab``, the array of ``key``).

  A bad label is a ``DataValidationError`` naming ``source``, ``key`` and its first row.
  """
  return _labels_to_ids(np.asarray(lab), source=source, key=key, num_classes=num_classes)


def validate_arrays(arrays: Mapping[str, np.ndarray], *, source: str,
                    num_classes: int | None = None, visual_dim: int | None = None,
                    audio_dim: int | None = None) -> dict[str, np.ndarray]:
  """Checks the six SPEC arrays and normalises them.

  Checks: every key present; features of rank 2 with the configured sizes (and
  the same size in train and test); audio, visual and label counts equal per
  split; no empty split; finite features; labels integer ids in 0..C-1 or
  one-hot rows; every class present in train.

  Args:
    arrays: dict with ``visual_train``, ``audio_train``, ``lab_train``,
      ``visual_test``, ``audio_test``, ``lab_test``.
    source: the file (or other origin) named in error messages.
    num_classes: expected class count; None infers ``max(label) + 1`` (or the
      one-hot width).
    visual_dim, audio_dim: expected feature sizes; None accepts the file's.

  Returns:
    Dict with the same six keys: features float32, labels int32 class ids.

  Raises:
    DataValidationError: any check fails.
  """
  missing = [k for k in ALL_KEYS if k not in arrays]
  if missing:
    raise DataValidationError(
        f"{source}: missing key(s) {missing}; expected all of {list(ALL_KEYS)}, found "
        f"{sorted(arrays)}")
  dims = {"visual": visual_dim, "audio": audio_dim}
  if num_classes is None:  # a one-hot width fixes the class count when it was not given
    num_classes = _one_hot_width(arrays, source=source)
  out = {}
  for split in SPLITS:
    counts = {}
    for field in ("visual", "audio"):
      key = KEYS[split][field]
      out[key] = _features(arrays[key], source=source, key=key, field=field, dim=dims[field])
      dims[field] = out[key].shape[1]  # test must match train
      counts[key] = out[key].shape[0]
    lkey = KEYS[split]["label"]
    lab = np.asarray(arrays[lkey])
    counts[lkey] = lab.shape[0] if lab.ndim else 0
    if len(set(counts.values())) != 1:
      raise DataValidationError(
          f"{source}: split {split!r} example counts differ: {counts}; expected equal counts")
    if counts[lkey] == 0:
      raise DataValidationError(
          f"{source}: split {split!r} is empty (keys {list(counts)} have 0 rows); expected at "
          "least one example")
    out[lkey] = _labels_to_ids(lab, source=source, key=lkey, num_classes=num_classes)
  _check_train_has_every_class(out, num_classes, source=source)
  return out


def _one_hot_width(arrays: Mapping[str, np.ndarray], *, source: str) -> int | None:
  """The class count a one-hot label array gives (None for class ids)."""
  widths = {KEYS[s]["label"]: np.shape(arrays[KEYS[s]["label"]])[1] for s in SPLITS
            if np.ndim(arrays[KEYS[s]["label"]]) == 2}
  if len(set(widths.values())) > 1:
    raise DataValidationError(
        f"{source}: key 'lab_test' has one-hot width {widths['lab_test']} but key "
        f"'lab_train' {widths['lab_train']}; expected the same width (the class count)")
  return widths.popitem()[1] if widths else None


def _features(x, *, source: str, key: str, field: str, dim: int | None) -> np.ndarray:
  """A feature array checked (rank 2, size ``dim`` when given, numeric, finite), float32."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise DataValidationError(
        f"{source}: key {key!r} has rank {x.ndim} (shape {x.shape}); expected rank 2 "
        f"(examples, {field} features)")
  if dim is not None and x.shape[1] != dim:
    raise DataValidationError(
        f"{source}: key {key!r} has feature size {x.shape[1]}; expected {dim}")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise DataValidationError(f"{source}: key {key!r} has dtype {x.dtype}; expected float")
  x = x.astype(np.float32, copy=False)
  _check_finite(x, source=source, key=key)
  return x


def _check_train_has_every_class(out: Mapping[str, np.ndarray], num_classes: int | None, *,
                                 source: str) -> None:
  """Every class has a train example. Without a class count (given, or a one-hot width) it
  is max(label) + 1: a class above train's largest then comes from a test label, and that
  label is what is reported."""
  inferred = num_classes is None
  if inferred:
    num_classes = int(max(out[KEYS[s]["label"]].max() for s in SPLITS)) + 1
  present = np.bincount(out["lab_train"], minlength=num_classes)
  absent = np.nonzero(present == 0)[0]
  if not absent.size:
    return
  unseen = (out["lab_test"] > out["lab_train"].max()) if inferred else np.zeros(0, bool)
  if unseen.any():
    row = int(np.nonzero(unseen)[0][0])
    raise DataValidationError(
        f"{source}: key 'lab_test' row {row} has label {int(out['lab_test'][row])}, a class "
        f"with no example in 'lab_train' (test rows with such labels: {int(unseen.sum())}); "
        f"expected only classes train has: {_class_list(np.nonzero(present)[0])}")
  raise DataValidationError(
      f"{source}: key 'lab_train' has no example of class(es) {_class_list(absent)}; "
      f"expected every class 0..{num_classes - 1} in train")


def _class_list(ids: np.ndarray, limit: int = 20) -> str:
  """``[0, 1, 5]``; ``0..9`` for a run; the first ``limit`` ids and the count for many."""
  ids = np.asarray(ids).tolist()
  if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
    return f"{ids[0]}..{ids[-1]}"
  if len(ids) > limit:
    return "[" + ", ".join(map(str, ids[:limit])) + f", ...] ({len(ids)} classes)"
  return str(ids)


def infer_num_classes(arrays: Mapping[str, np.ndarray]) -> int:
  """The class count of validated arrays (``max label + 1``)."""
  return int(max(arrays["lab_train"].max(), arrays["lab_test"].max())) + 1
