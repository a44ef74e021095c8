"""Validating the six arrays of a paired-feature file (and one split of one).

Every check raises ``DataValidationError`` with a message naming the file, the
key, what was expected and what was found, so that nothing a file gets wrong
reaches training silently. Reading the files is ``dsf3n_jax.datasets.files``
(its names are also importable from here).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import numpy as np

from dsf3n_jax.datasets.files import (  # noqa: F401 - re-exported: the readers' old home
    ALL_KEYS,
    KEYS,
    NPZ_EXPECTED,
    PAIRED_EXPECTED,
    SPLITS,
    SUFFIXES,
    DataValidationError,
    NpzArrays,
    file_keys,
    file_kind,
    open_npz,
    peek_shapes,
    read_npz,
    read_paired_file,
    split_keys,
)


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
  keys = split_keys(split)
  arrays = read_paired_file(path, keys.values())
  if len(arrays) < len(keys):
    found = sorted(file_keys(path))
    raise KeyError(f"{os.fspath(path)}: missing {[k for k in keys.values() if k not in arrays]} "
                   f"for split {split!r}; found {found}")
  source = os.fspath(path)
  out = [_features(arrays[keys[f]], source=source, key=keys[f], field=f, dim=None)
         for f in ("visual", "audio")]
  out.append(labels_to_ids(arrays[keys["label"]], source=source, key=keys["label"]))
  _check_equal_counts({k: len(a) for k, a in zip(keys.values(), out, strict=True)},
                      source=source, split=split)
  return out[0], out[1], out[2].astype(np.int64)

def _check_finite(x: np.ndarray, *, source: str, key: str) -> None:
  bad = ~np.isfinite(x)
  if bad.any():
    rows = np.nonzero(bad.reshape(len(x), -1).any(axis=1))[0]
    raise DataValidationError(
        f"{source}: key {key!r} has {int(bad.sum())} non-finite values (NaN or +-Inf) in "
        f"{len(rows)} rows; first bad row {int(rows[0])}; expected all finite")


# The largest class id: ids are int32 on the device.
MAX_CLASS_ID = int(np.iinfo(np.int32).max)


def _labels_to_ids(lab: np.ndarray, *, source: str, key: str,
                   num_classes: int | None) -> np.ndarray:
  """Integer ids from integer ids or one-hot rows (checked)."""
  if lab.ndim == 2 and lab.shape[1] == 1:  # a column of class ids, not one-hot of one class
    lab = lab[:, 0]
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
    lab = lab.astype(np.float64)  # exact for float16/32; int32's bounds compare without overflow
  elif not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
    raise DataValidationError(
        f"{source}: key {key!r} has dtype {lab.dtype}; expected integer class ids or one-hot rows")
  # Compared in the stored dtype (numpy compares integers of any width with Python ints
  # exactly), then cast: a uint64 or a label past int32 is reported as stored, never wrapped.
  hi = num_classes - 1 if num_classes is not None else MAX_CLASS_ID
  bad = (lab < 0) | (lab > hi)
  if bad.any():
    first = int(np.nonzero(bad)[0][0])
    expected = (f"0..{hi}" if num_classes is not None
                else f"0..{MAX_CLASS_ID} (class ids are >= 0 and fit int32)")
    raise DataValidationError(
        f"{source}: key {key!r} row {first} has label {lab[first].item()!r}, outside "
        f"{expected} (rows with such labels: {int(bad.sum())})")
  return lab.astype(np.int32)


def labels_to_ids(lab, *, source: str, key: str,
                  num_classes: int | None = None) -> np.ndarray:
  """Checked int32 class ids from class ids or one-hot rows (``lab``, the array of ``key``).

  A bad label is a ``DataValidationError`` naming ``source``, ``key`` and its first row.
  """
  return _labels_to_ids(np.asarray(lab), source=source, key=key, num_classes=num_classes)


def validate_arrays(arrays: Mapping[str, np.ndarray], *, source: str,
                    num_classes: int | None = None, visual_dim: int | None = None,
                    audio_dim: int | None = None) -> dict[str, np.ndarray]:
  """Checks the six paired-feature arrays and normalises them.

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
    _check_equal_counts(counts, source=source, split=split)
    if counts[lkey] == 0:
      raise DataValidationError(
          f"{source}: split {split!r} is empty (keys {list(counts)} have 0 rows); expected at "
          "least one example")
    out[lkey] = _labels_to_ids(lab, source=source, key=lkey, num_classes=num_classes)
  _check_train_has_every_class(out, num_classes, source=source)
  _check_enough_classes_and_items(out, source=source)
  return out


class DegenerateDataWarning(UserWarning):
  """Data a run can train on whose retrieval scores say little (e.g. a test split smaller
  than its class count)."""


def _check_enough_classes_and_items(out: Mapping[str, np.ndarray], *, source: str) -> None:
  """At least 2 classes in train (else every item is relevant to every query: mAP 1.0 for
  any model); a warning for a split with fewer items than classes."""
  present = np.unique(out["lab_train"])
  if present.size < 2:
    raise DataValidationError(
        f"{source}: key 'lab_train' has only class {int(present[0])} ({len(out['lab_train'])} "
        "rows); expected at least 2 classes: with one, every item is relevant to every query "
        "and the mAP is 1.0 for any model")
  classes = int(max(out[KEYS[s]["label"]].max() for s in SPLITS)) + 1
  for split in SPLITS:
    n = len(out[KEYS[split]["label"]])
    if n < classes:
      warnings.warn(
          f"{source}: split {split!r} has {n} item(s) for {classes} classes (key "
          f"{KEYS[split]['label']!r}): its retrieval scores say little (one item: mAP 1.0 "
          "for any model)", DegenerateDataWarning, stacklevel=3)


def _check_equal_counts(counts: Mapping[str, int], *, source: str, split: str) -> None:
  if len(set(counts.values())) != 1:
    raise DataValidationError(
        f"{source}: split {split!r} example counts differ: {dict(counts)}; expected equal "
        "counts")


def _one_hot_width(arrays: Mapping[str, np.ndarray], *, source: str) -> int | None:
  """The class count a one-hot label array gives (None for class ids)."""
  widths = {KEYS[s]["label"]: np.shape(arrays[KEYS[s]["label"]])[1] for s in SPLITS
            if np.ndim(arrays[KEYS[s]["label"]]) == 2
            and np.shape(arrays[KEYS[s]["label"]])[1] != 1}  # (N, 1): a column of ids
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
  if x.shape[1] == 0:
    raise DataValidationError(
        f"{source}: key {key!r} has shape {x.shape}, no {field} features; expected at least "
        "one feature per example")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise DataValidationError(f"{source}: key {key!r} has dtype {x.dtype}; expected float")
  # Checked in the stored dtype: a finite float64 past float32's range is reported as too
  # large, not as the Inf its cast would make it.
  _check_finite(x, source=source, key=key)
  _check_magnitude(x, source=source, key=key)
  return x.astype(np.float32, copy=False)


# Features above this overflow float32 in the first layers: the encoder's sums reach
# sqrt(features) times them and BatchNorm squares those (float32 ends at 3.4e38).
MAX_FEATURE_MAGNITUDE = 1e15


def _check_magnitude(x: np.ndarray, *, source: str, key: str) -> None:
  big = np.abs(x) > MAX_FEATURE_MAGNITUDE
  if big.any():
    rows = np.nonzero(big.any(axis=1))[0]
    value = float(np.abs(x[rows[0]]).max())
    raise DataValidationError(
        f"{source}: key {key!r} row {int(rows[0])} has a value of {value:.3g} ({len(rows)} "
        f"rows above {MAX_FEATURE_MAGNITUDE:.0e}); features this large overflow "
        "float32 arithmetic in the model's first layers; rescale them")


def _check_train_has_every_class(out: Mapping[str, np.ndarray], num_classes: int | None, *,
                                 source: str) -> None:
  """Every class has a train example. Without a class count (given, or a one-hot width) it
  is max(label) + 1: a class above train's largest then comes from a test label, and that
  label is what is reported."""
  inferred = num_classes is None
  if inferred:
    num_classes = int(max(out[KEYS[s]["label"]].max() for s in SPLITS)) + 1
  train = out["lab_train"]
  present = np.unique(train)
  if present.size == num_classes:
    return
  unseen = (out["lab_test"] > train.max()) if inferred else np.zeros(0, bool)
  if unseen.any():
    row = int(np.nonzero(unseen)[0][0])
    raise DataValidationError(
        f"{source}: key 'lab_test' row {row} has label {int(out['lab_test'][row])}, a class "
        f"with no example in 'lab_train' (test rows with such labels: {int(unseen.sum())}); "
        f"expected only classes train has: {_class_list(present)}")
  if num_classes > 2 * len(train) + 1000:  # far more classes than train rows: not listed
    row = int(np.argmax(train))
    why = (f"row {row} has label {int(train[row])}, which makes {num_classes} classes"
           if inferred else f"{num_classes} classes")
    raise DataValidationError(
        f"{source}: key 'lab_train' has {len(train)} rows and {present.size} distinct classes; "
        f"{why}, {num_classes - present.size} of them without an example; expected every "
        f"class 0..{num_classes - 1} in train")
  absent = np.setdiff1d(np.arange(num_classes), present)
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
