"""Data sources: the splits of a dataset as random-access sources, by dataset name.

A *source* is anything with ``__len__`` and ``__getitems__(indices)`` returning
a dict of stacked numpy arrays ``visual`` (float32), ``audio`` (float32),
``label`` (int32 class ids) and ``index`` (int64 row in the source file):
``ArraySource`` (in memory), ``TfdsSource`` (a ``tfds.data_source`` over
array_record files), ``SubsetSource`` (rows of another source) and
``StandardizedSource``. ``load_sources`` gives a dataset's splits by name: the
in-memory ``synthetic``, the project's TFDS builders, or any registered TFDS
dataset with ``visual``, ``audio`` and ``label`` features.

Nothing here imports TensorFlow; TFDS is imported only to read or build a
TFDS dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from dsf3n_jax.datasets import synthetic as synthetic_lib
from dsf3n_jax.datasets import validation
from dsf3n_jax.datasets.validation import DataValidationError

FIELDS = ("visual", "audio", "label", "index")
# The project's own datasets. Any other TFDS dataset (a registered builder) with ``visual``,
# ``audio`` and ``label`` features works by name too (``load_sources``).
DATASETS = ("synthetic", "vegas", "ave", "paired_features")
_PROJECT_BUILDERS = ("vegas", "ave", "paired_features")


class Source(Protocol):
  """Random access to a split: ``__len__`` and ``__getitems__``."""

  def __len__(self) -> int: ...

  def __getitems__(self, indices) -> dict[str, np.ndarray]: ...


class ArraySource:
  """A source over in-memory numpy arrays.

  Args:
    visual: (N, Dv) features.
    audio: (N, Da) features.
    label: (N,) integer class ids.
    index: (N,) rows in the source file (default ``arange(N)``).
  """

  def __init__(self, visual, audio, label, index=None):
    self.visual = np.asarray(visual, np.float32)
    self.audio = np.asarray(audio, np.float32)
    self.label = np.asarray(label).astype(np.int32)
    self.index = (np.arange(len(self.label), dtype=np.int64) if index is None
                  else np.asarray(index, np.int64))
    counts = {k: len(getattr(self, k)) for k in FIELDS}
    if len(set(counts.values())) != 1:
      raise ValueError(f"ArraySource: row counts differ: {counts}")

  def __len__(self) -> int:
    return len(self.label)

  def __getitems__(self, indices) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    return {k: getattr(self, k)[idx] for k in FIELDS}


class SubsetSource:
  """Rows ``rows`` of another source (e.g. train without its validation rows).

  Args:
    source: the parent source.
    rows: parent positions, in the order they are exposed.
  """

  def __init__(self, source: Source, rows):
    self.source = source
    self.rows = np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitems__(self, indices) -> dict[str, np.ndarray]:
    return self.source.__getitems__(self.rows[np.asarray(indices, np.int64)])


class StandardizedSource:
  """Another source with each feature standardised: ``(x - mean) / std``.

  Args:
    source: the parent source.
    stats: ``{"visual": (mean, std), "audio": (mean, std)}`` (per-feature arrays).
  """

  def __init__(self, source: Source, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    self.source = source
    self.stats = stats

  def __len__(self) -> int:
    return len(self.source)

  def __getitems__(self, indices) -> dict[str, np.ndarray]:
    out = dict(self.source.__getitems__(indices))
    for key, mean_std in self.stats.items():
      out[key] = standardized(out[key], mean_std)
    return out


def standardized(x: np.ndarray, mean_std: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """``(x - mean) / std`` in float32: features as a run standardised its own (``standardize``'s
  statistics), wherever they come from."""
  mean, std = mean_std
  return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32)


def standardize(sources: Sources) -> Sources:
  """Standardises every split's features with the train split's mean and std.

  Features with zero variance in train get std 1 (they become constant 0).
  """
  arrays = load_split_arrays(sources.train)
  stats = {}
  for key in ("visual", "audio"):
    x = arrays[key].astype(np.float64)
    std = x.std(axis=0)
    stats[key] = (x.mean(axis=0).astype(np.float32),
                  np.where(std > 0, std, 1.0).astype(np.float32))
  wrap = lambda src: None if src is None else StandardizedSource(src, stats)
  return dataclasses.replace(sources, train=wrap(sources.train), test=wrap(sources.test),
                             validation=wrap(sources.validation))


class TfdsSource:
  """Adapter of a ``tfds.data_source`` (array_record) split to the source protocol.

  Args:
    data_source: what ``builder.as_data_source(split)`` returns.
    name: for error messages.
  """

  def __init__(self, data_source, *, name: str = "tfds"):
    self.data_source = data_source
    self.name = name

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitems__(self, indices) -> dict[str, np.ndarray]:
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    rows = self.data_source.__getitems__(idx) if idx else []
    out = {
        "visual": np.stack([r["visual"] for r in rows]).astype(np.float32, copy=False)
        if rows else np.zeros((0, 0), np.float32),
        "audio": np.stack([r["audio"] for r in rows]).astype(np.float32, copy=False)
        if rows else np.zeros((0, 0), np.float32),
        "label": np.asarray([r["label"] for r in rows], np.int32),
        "index": np.asarray([r.get("index", i) for r, i in zip(rows, idx)], np.int64),
    }
    # Our builders write in file order; a mismatch means a foreign or corrupted dataset. A
    # dataset without an 'index' feature is indexed by position.
    if not np.array_equal(out["index"], np.asarray(idx, np.int64)):
      raise DataValidationError(
          f"{self.name}: stored 'index' does not match the record position (expected "
          f"{idx[:5]}..., found {out['index'][:5].tolist()}...); rebuild the dataset")
    return out


@dataclasses.dataclass
class Sources:
  """The splits of one dataset and its sizes."""

  train: Any
  test: Any
  validation: Any | None
  num_classes: int
  visual_dim: int
  audio_dim: int
  name: str
  # What identifies the data beyond its sizes: the synthetic generator's arguments, or the
  # TFDS dataset's full name (name/config/version).
  origin: dict = dataclasses.field(default_factory=dict)


VALIDATION_GROUPS = ("none", "duplicates")  # config.data.validation_groups


class SharedItemsWarning(UserWarning):
  """Validation rows whose visual or audio features are a train row's too (a dataset that
  pairs one item with several others): their scores overrate the model."""


def duplicate_groups(visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
  """(N,) group ids: rows that share an exact visual or audio feature vector, directly or
  through other rows, are one group (an image paired with two clips and the rows of both)."""
  n = len(visual)
  parent = np.arange(n)

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for x in (visual, audio):
    x = np.ascontiguousarray(x + np.zeros((), x.dtype))  # -0.0 as +0.0: equal values, equal bytes
    rows = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    for i in np.nonzero(first[inverse] != np.arange(n))[0]:  # rows repeating an earlier one
      parent[root(int(i))] = root(int(first[inverse[i]]))
  return np.array([root(i) for i in range(n)], np.int64)


def stratified_split(labels: np.ndarray, *, fraction: float, seed: int,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Carves a stratified validation subset out of train.

  Args:
    labels: (N,) class ids of train.
    fraction: share of each class moved to validation (0 <= fraction < 1).
    seed: numpy seed of the draw.
    groups: (N,) group ids (``duplicate_groups``): whole groups are drawn, each counted in
      the class of its first row, up to the class's share (None: single rows).

  Returns:
    ``(train_rows, validation_rows)``, each sorted (file order), disjoint and
    together ``arange(N)``. Each class keeps at least one train row (a group).

  Raises:
    DataValidationError: a positive ``fraction`` that carves no row.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  val = []
  if groups is None:
    for c in np.unique(labels):
      rows = np.nonzero(labels == c)[0]
      k = min(int(round(fraction * len(rows))), len(rows) - 1)
      val.append(rng.permutation(rows)[:k])
  else:
    _, first, sizes = np.unique(groups, return_index=True, return_counts=True)
    members = np.split(np.argsort(groups, kind="stable"), np.cumsum(sizes)[:-1])
    chosen = []
    for c in np.unique(labels):
      in_class = np.nonzero(labels[first] == c)[0]  # the groups counted in class c
      target = int(round(fraction * int((labels == c).sum())))
      taken, kept = 0, len(in_class)
      for g in rng.permutation(in_class):
        if kept > 1 and taken + sizes[g] <= target:
          chosen.append(g)
          taken, kept = taken + sizes[g], kept - 1
    in_val = np.zeros(len(labels), bool)
    for g in chosen:
      in_val[members[g]] = True
    for c in np.unique(labels):  # a group spanning classes may take a class's last train rows
      if not (~in_val & (labels == c)).any():
        g = next(g for g in chosen if (labels[members[g]] == c).any() and in_val[members[g][0]])
        in_val[members[g]] = False
    val = [np.nonzero(in_val)[0]]
  val = np.sort(np.concatenate(val)) if val else np.zeros((0,), np.int64)
  if fraction and not val.size:  # an empty split would fail every evaluation on it
    sizes = np.unique(labels, return_counts=True)[1] if len(labels) else np.zeros(1, int)
    largest = int(sizes.max())
    raise DataValidationError(
        f"config.data.validation_fraction={fraction} carves no validation row: train's "
        f"{len(sizes)} classes have {sizes.min()}..{largest} rows and the carve takes "
        f"round(fraction x rows) of each, keeping one in train; expected "
        + (f"a fraction above {0.5 / largest:.3g}, or 0 for no validation split"
           if largest > 1 else "0 (no validation split): no class has a row to spare"))
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train.astype(np.int64), val.astype(np.int64)


def carve_validation(train: Source, labels: np.ndarray, *, fraction: float, seed: int,
                     groups: str = "none", arrays: Mapping[str, np.ndarray] | None = None,
                     name: str = "") -> tuple[SubsetSource, SubsetSource]:
  """``(train, validation)``: the rows of ``train`` that ``stratified_split`` of its ``labels``
  keeps in train, and those it moves to validation (``load_sources``'s carve).

  ``groups="duplicates"``: rows sharing a feature vector go to one split together
  (``duplicate_groups``); "none": row by row, with a ``SharedItemsWarning`` when validation
  rows share one with train. ``arrays``: train's (read from ``train`` when not given).
  """
  if groups not in VALIDATION_GROUPS:
    raise ValueError(f"config.data.validation_groups={groups!r}: expected one of "
                     f"{', '.join(VALIDATION_GROUPS)}")
  arrays = load_split_arrays(train) if arrays is None else arrays
  ids = duplicate_groups(arrays["visual"], arrays["audio"])
  train_rows, val_rows = stratified_split(labels, fraction=fraction, seed=seed,
                                          groups=ids if groups == "duplicates" else None)
  shared = int(np.isin(ids[val_rows], ids[train_rows]).sum())
  if shared:
    warnings.warn(
        f"{name or 'train'}: {shared} of the {len(val_rows)} validation rows carved from train "
        "share a visual or audio feature vector with a train row (an item paired more than "
        "once): validation scores overrate the model; config.data.validation_groups="
        "'duplicates' carves such rows together", SharedItemsWarning, stacklevel=2)
  return SubsetSource(train, train_rows), SubsetSource(train, val_rows)


def _check_dims(name: str, *, found: Mapping[str, int], expected: Mapping[str, int | None]):
  for k, want in expected.items():
    if want is not None and int(want) != int(found[k]):
      raise DataValidationError(f"{name}: {k} is {found[k]} in the data; expected {want} "
                                f"(flag/config {k})")


def _tfds_sizes(builder, train, *, name: str) -> dict[str, int | None]:
  """Class count and feature sizes from the metadata (ours) or the features (any dataset)."""
  meta = builder.info.metadata or {}
  if all(k in meta for k in ("num_classes", "visual_dim", "audio_dim")):
    return {k: int(meta[k]) for k in ("num_classes", "visual_dim", "audio_dim")}
  features = builder.info.features
  missing = [k for k in ("visual", "audio", "label") if k not in features]
  if missing:
    raise DataValidationError(
        f"TFDS dataset {name!r} ({builder.info.full_name}): no feature(s) {missing}; expected "
        f"'visual' (Dv,) float, 'audio' (Da,) float and 'label' (class id); found "
        f"{sorted(features.keys())}")
  shapes = {k: tuple(features[k].shape) for k in ("visual", "audio")}
  bad = {k: v for k, v in shapes.items() if len(v) != 1 or not v[0]}
  if bad:
    raise DataValidationError(f"TFDS dataset {name!r}: features {bad} must be vectors of a "
                              "fixed size")
  label = features["label"]
  return {"num_classes": getattr(label, "num_classes", None),
          "visual_dim": int(shapes["visual"][0]), "audio_dim": int(shapes["audio"][0])}


def _locate_metadata(builder_cls) -> None:
  """A builder in a plain module (not a package), e.g. beside a user's config: TFDS looks for
  its metadata files in the module's package, so point it at the module's folder."""
  if builder_cls.__dict__.get("pkg_dir_path") is None and "." not in builder_cls.__module__:
    import inspect

    from etils import epath
    builder_cls.pkg_dir_path = epath.Path(inspect.getfile(builder_cls)).parent


class UnknownDatasetError(DataValidationError):
  """A dataset name that no builder of this process answers to (``load_sources``' ``flag``)."""


def _tfds_builder(name: str, *, data_dir, path, num_classes, flag: str = "config.data.name"):
  """The (prepared) TFDS builder of ``name``; builds it first when needed.

  ``name`` is one of the project's builders or any TFDS dataset whose builder
  is registered (``"module:name"`` imports ``module`` first, which registers
  a user's builder). A name that none answers to is an ``UnknownDatasetError`` naming
  ``flag``, where the name was given.
  """
  import importlib

  import tensorflow_datasets as tfds

  from dsf3n_jax.datasets import builders

  given = f"{flag}={name!r}" if flag.startswith("config.") else f"{flag}={name}"
  if ":" in name:
    module, name = name.split(":", 1)
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise UnknownDatasetError(f"{given}: cannot import {module!r} ({e})") from e
  if name not in _PROJECT_BUILDERS:
    try:
      _locate_metadata(tfds.core.registered.imported_builder_cls(name.split("/")[0]))
    except Exception:  # noqa: BLE001 - tfds.builder below says what is wrong
      pass
    try:
      make = functools.partial(tfds.builder, name, data_dir=data_dir,
                               file_format="array_record")
      builder = make()
    except Exception as e:  # noqa: BLE001 - tfds raises DatasetNotFoundError and friends
      how = ("by the config file, or name it 'module:name'" if flag == "config.data.name"
             else f"name it {flag}=module:name")
      # No such dataset: the name (a bad --tfds flag); anything else (an unreadable data_dir,
      # a damaged dataset_info.json): the data.
      unknown = isinstance(e, tfds.core.registered.DatasetNotFoundError)
      raise (UnknownDatasetError if unknown else DataValidationError)(
          f"{given}: not 'synthetic' and not a TFDS dataset this process "
          f"can build ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''});"
          f" the project's: {', '.join(DATASETS)}; a builder of "
          f"your own registers when its module is imported ({how})") from e
    return _prepared(builder, make)

  manual_dir = None
  if name == "paired_features":
    config = (builders.paired_features_config(path, num_classes=num_classes) if path
              else "manual")
    make = functools.partial(tfds.builder, name, config=config, data_dir=data_dir)
  else:
    make = functools.partial(tfds.builder, name, data_dir=data_dir)
    if path is not None:
      manual_dir = os.fspath(path)
      manual_dir = manual_dir if os.path.isdir(manual_dir) else os.path.dirname(manual_dir)
  builder = make()
  if not builder.is_prepared():
    if name == "paired_features" and not path:
      raise DataValidationError(
          "paired_features: no `path` given and no prepared `manual` config in data_dir "
          f"{data_dir}; pass path=FILE (flag --config.data.path)")
  return _prepared(builder, make,
                   download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _prepared(builder, make, **kwargs):
  """``builder`` prepared: built unless it is; one process at a time builds a dataset.

  A second process building the same dataset (same ``data_dir``, name, config and
  version) waits for the first, under an exclusive lock on a file beside the version's
  folder, then reads what the first built (``make()`` builds the builder anew) instead of
  failing on TFDS's rename of the first's ``incomplete.*`` folder. A remote ``data_dir``
  (a bucket) has no such lock. A builder made while another process was still building
  holds that moment's empty dataset info: it is made anew once the dataset is there.
  """
  if builder.is_prepared():
    # Prepared by another process after ``builder`` read its (then empty) info: read it anew.
    return builder if builder.info.splits else make()
  folder = os.fspath(builder.data_dir)
  if "://" in folder:
    builder.download_and_prepare(**kwargs)
    return builder
  import fcntl  # pylint: disable=g-import-not-at-top
  parent, version = os.path.split(folder)
  os.makedirs(parent, exist_ok=True)
  with open(os.path.join(parent, f".{version}.build.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process builds it
    try:
      builder = make()
      if not builder.is_prepared():
        builder.download_and_prepare(**kwargs)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def load_sources(name: str, *, data_dir: str | None = None, path: str | None = None,
                 num_classes: int | None = None, visual_dim: int | None = None,
                 audio_dim: int | None = None, validation_fraction: float = 0.0,
                 validation_seed: int = 0, validation_groups: str = "none",
                 synthetic: Mapping[str, Any] | None = None,
                 flag: str = "config.data.name") -> Sources:
  """Loads a dataset's splits as sources (building the TFDS dataset when needed).

  Args:
    name: "synthetic", "vegas", "ave" or "paired_features".
    data_dir: TFDS data directory (default: TFDS's, ``~/tensorflow_datasets``).
    path: paired_features: the ``.h5``/``.npz`` file; vegas/ave: the manual
      directory (or the file in it) used if the dataset is not built yet.
    num_classes, visual_dim, audio_dim: if given, checked against the data.
    validation_fraction: share of train (stratified by class) moved to a
      validation split; 0 gives ``validation=None``.
    validation_seed: seed of that draw.
    validation_groups: "none" (rows drawn one by one) or "duplicates" (rows sharing a
      feature vector drawn together: ``carve_validation``).
    synthetic: keyword arguments of ``generate_synthetic`` (synthetic only;
      generated in memory, identical to the TFDS ``synthetic`` builder).
    flag: where ``name`` was given, for the error when no dataset answers to it.

  Returns:
    ``Sources``.

  Raises:
    UnknownDatasetError: no dataset of that name (a ``DataValidationError``).
    DataValidationError: bad file, or sizes that differ from the given ones.
  """
  if name == "synthetic":
    kwargs = dict(synthetic or {})
    if num_classes is not None:
      if kwargs.setdefault("num_classes", num_classes) != num_classes:
        raise DataValidationError(
            f"config.data.num_classes={num_classes}, but the synthetic data has "
            f"config.data.synthetic.num_classes={kwargs['num_classes']} classes; expected the "
            "same (set data.synthetic.num_classes, or data.num_classes=0 to take the data's)")
    arrays = synthetic_lib.generate_synthetic(**kwargs)
    arrays = validation.validate_arrays(arrays, source="synthetic", num_classes=num_classes,
                                        visual_dim=visual_dim, audio_dim=audio_dim)
    train = ArraySource(arrays["visual_train"], arrays["audio_train"], arrays["lab_train"])
    test = ArraySource(arrays["visual_test"], arrays["audio_test"], arrays["lab_test"])
    found = dict(num_classes=validation.infer_num_classes(arrays),
                 visual_dim=arrays["visual_train"].shape[1],
                 audio_dim=arrays["audio_train"].shape[1])
    train_labels = arrays["lab_train"]
    train_arrays = {"visual": arrays["visual_train"], "audio": arrays["audio_train"]}
    origin = {"synthetic": kwargs}
  else:
    # "~" is the home folder in the config as in a shell (which leaves --flag=~/x as it is).
    data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
    path = None if path is None else os.path.expanduser(os.fspath(path))
    builder = _tfds_builder(name, data_dir=data_dir, path=path, num_classes=num_classes,
                            flag=flag)
    meta = builder.info.metadata or {}
    source_name = f"{name} ({meta.get('source', builder.data_path)})"
    train = TfdsSource(builder.as_data_source("train"), name=source_name)
    test = TfdsSource(builder.as_data_source("test"), name=source_name)
    found = _tfds_sizes(builder, train, name=name)
    ours = name.split(":", 1)[-1].split("/")[0] in _PROJECT_BUILDERS
    train_arrays = load_split_arrays(train) if validation_fraction or not ours else None
    if not ours:  # checked as the project's builders check their files when they build
      test_arrays = load_split_arrays(test)
      where = f"TFDS dataset {name!r} ({builder.info.full_name}; keys: feature_split)"
      for split, arrays in (("train", train_arrays), ("test", test_arrays)):
        if np.ndim(arrays["label"]) != 1:
          raise DataValidationError(
              f"{where}: key 'lab_{split}' has shape {np.shape(arrays['label'])}; expected "
              "one class id per example (a ClassLabel or an integer Scalar)")
      # Every class that occurs must occur in train; a ClassLabel may declare more classes.
      split_arrays = {"train": train_arrays, "test": test_arrays}
      checked = validation.validate_arrays(
          {key: split_arrays[split][field] for split, keys in validation.KEYS.items()
           for field, key in keys.items()},
          source=where, visual_dim=found["visual_dim"], audio_dim=found["audio_dim"])
      if found["num_classes"] is None:  # a plain integer label: max + 1 over both splits
        found["num_classes"] = validation.infer_num_classes(checked)
    train_labels = None if train_arrays is None else train_arrays["label"]
    origin = {"tfds": builder.info.full_name}
  _check_dims(name, found=found, expected=dict(num_classes=num_classes, visual_dim=visual_dim,
                                               audio_dim=audio_dim))
  val = None
  if validation_fraction:
    train, val = carve_validation(train, train_labels, fraction=validation_fraction,
                                  seed=validation_seed, groups=validation_groups,
                                  arrays=train_arrays, name=name)
  return Sources(train=train, test=test, validation=val, name=name, origin=origin, **found)


def load_split_arrays(source: Source) -> dict[str, np.ndarray]:
  """The whole split as numpy arrays (``visual``, ``audio``, ``label``, ``index``)."""
  return source.__getitems__(np.arange(len(source), dtype=np.int64))
