"""Build a search index of a library: embed it once, in chunks, and store the embeddings.

``python -m dsf3n_jax.index --workdir=RUN --modality=visual --out=INDEX`` embeds
the items of one modality, each from its own modality alone (the unimodal
protocol), with the run's model, sharded over this host's devices, and writes
``INDEX/``:

* ``embeddings-NNNNN.npy`` (rows, dim) float32, ``ids-NNNNN.npy`` (rows,) and,
  when the source has labels, ``labels-NNNNN.npy``: one shard per chunk;
* ``manifest.json``: format, modality, protocol, dim, dtype, count, the shards,
  the model's fingerprint (a hash of its config and variables; queries must be
  embedded by the same model) and where the items came from.

The source (``--source`` / ``--tfds``, default: the run's own dataset):

* a paired-feature file (``.npz``/``.h5`` with ``visual_<split>``, ...): the
  modality's features of ``--split``, with its labels;
* a features-only file: ``.npy`` (read through a memory map, so a library
  larger than host memory is embedded chunk by chunk) or ``.npz`` with one
  feature array, optionally beside ``ids`` and ``labels``;
* a TFDS dataset by name (``--tfds=NAME --split=...``).

Ids are the items' row numbers unless the source gives ``ids``. A run trained
with ``data.normalize=standardize`` standardises new features with its train
statistics, as in training. A build killed midway resumes where it stopped:
each finished shard is recorded in ``progress-P.json`` (P: the process), and a
rerun of the same command embeds only the missing ones. With several
processes (``jax.distributed``), process P embeds the shards ``i % count == P``
on its own devices and process 0 writes the manifest once all are done.

``--embeddings=FILE`` builds an index from embeddings computed elsewhere
(``.npy``, or ``.npz`` with one array and optional ``ids`` / ``labels``); its
manifest has no model fingerprint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dsf3n_jax import cli, paths
from dsf3n_jax.paths import atomic_file, atomic_write
from dsf3n_jax.training.workdir import log

MANIFEST = "manifest.json"
FORMAT = 1
MODALITIES = ("visual", "audio")
DTYPE = "float32"


def other(modality: str) -> str:
  return "audio" if modality == "visual" else "visual"


def check_modality(modality: str, *, flag: str = "--modality") -> str:
  if modality not in MODALITIES:
    raise cli.UsageError(f"{flag}={modality}: expected one of {', '.join(MODALITIES)}")
  return modality


# -- the model ---------------------------------------------------------------------------------

def model_fingerprint(model_config: Mapping[str, Any], variables: Mapping[str, Any]) -> str:
  """SHA-256 of the model's config and every variable (names, dtypes, shapes, bytes)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(json.dumps(dict(model_config), sort_keys=True, default=str).encode())
  for key, value in sorted(traverse_util.flatten_dict(dict(variables), sep="/").items()):
    value = np.asarray(value)
    h.update(f"{key}:{value.dtype}:{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class RunModel:
  """A training run's model, ready to embed one modality alone."""

  workdir: str
  model: Any
  variables: Any
  config: Any
  model_config: dict[str, Any]
  fingerprint: str

  @classmethod
  def load(cls, workdir, *, which: str = "best") -> RunModel:
    """The run's ``which`` checkpoint ("best": the one it selected, or "latest")."""
    from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
    from dsf3n_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    model, variables, config = train.restore_model(str(workdir), which=which)
    mcfg = workdir_lib.read_run_config(workdir)["model"]
    return cls(str(workdir), model, variables, config, mcfg, model_fingerprint(mcfg, variables))

  def input_dim(self, modality: str) -> int:
    return int(self.model_config[f"{modality}_dim"])

  def standardization(self, modality: str):
    """``(mean, std)`` of the run's train features when it standardises them, else None."""
    from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
    stats = train.feature_stats(self.config, self.workdir)
    return None if stats is None else stats[modality]

  def embedder(self, modality: str, *, batch_size: int = 1024) -> Callable[[np.ndarray],
                                                                          np.ndarray]:
    """``features (n, dim) -> embeddings (n, embed_dim)``, over this host's devices."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

    from dsf3n_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    from dsf3n_jax.mesh import DATA_AXIS, make_mesh  # pylint: disable=g-import-not-at-top
    mesh = make_mesh(jax.local_devices())
    method = self.model.embed_visual if modality == "visual" else self.model.embed_audio
    model, variables = self.model, self.variables

    def apply(v, x):
      out = model.apply(v, x, method=method)
      return out.astype(np.promote_types(out.dtype, np.float32))

    fn = jax.jit(jax.shard_map(apply, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P(DATA_AXIS), check_vma=False))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    batch = -(-batch_size // mesh.size) * mesh.size
    stats = self.standardization(modality)
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def embed(features: np.ndarray) -> np.ndarray:
      x = np.asarray(features, np.float32)
      if stats is not None:
        x = input_pipeline.standardized(x, stats)
      outs = []
      for lo in range(0, len(x), batch):
        part = x[lo:lo + batch]
        padded = np.pad(part, ((0, batch - len(part)), (0, 0)))
        outs.append((len(part), fn(variables, jax.device_put(padded, sharding))))
      return np.concatenate([np.asarray(o)[:n] for n, o in outs]) if outs else np.zeros(
          (0, model.embed_dim), np.float32)

    return embed


# -- the source --------------------------------------------------------------------------------

@dataclasses.dataclass
class Library:
  """The items to index: features (or embeddings), their ids and optional labels.

  Either arrays (``rows`` may be a read-only memory map) or a dataset source
  (``source``, read through ``__getitems__`` one chunk at a time, its
  ``modality`` field as rows, ``label`` and ``index``); both are read chunk by
  chunk, so a library larger than host memory is never held whole.
  """

  rows: Any  # (n, dim) array or memory map; None with a source
  ids: np.ndarray | None
  labels: np.ndarray | None
  origin: dict[str, Any]  # where it came from (the manifest's "source")
  where: str  # for messages: the file or flag
  source: Any = None
  modality: str | None = None

  @property
  def has_labels(self) -> bool:
    return self.source is not None or self.labels is not None

  def __len__(self) -> int:
    return len(self.source) if self.source is not None else int(self.rows.shape[0])

  def chunk(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(rows, ids, labels)`` of items ``lo..hi-1``."""
    if self.source is not None:
      part = self.source.__getitems__(np.arange(lo, hi, dtype=np.int64))
      return np.asarray(part[self.modality], np.float32), part["index"], part["label"]
    labels = None if self.labels is None else np.asarray(self.labels[lo:hi])
    return np.asarray(self.rows[lo:hi], np.float32), np.asarray(self.ids[lo:hi]), labels


def _file_origin(path: pathlib.Path, **extra) -> dict[str, Any]:
  """A source file as the manifest records it (a changed file is a different library)."""
  stat = path.stat()
  return {"file": str(path.resolve()), **extra, "bytes": stat.st_size,
          "modified_ns": stat.st_mtime_ns}


def read_features(path: pathlib.Path, *, what: str) -> Library:
  """``.npy`` (memory-mapped), or ``.npz`` with one 2-D array and optional ids / labels."""
  from dsf3n_jax.datasets import validation  # pylint: disable=g-import-not-at-top
  expected = (f"{what}: an (n, dim) float array as .npy, or an .npz of one such array with "
              "optional 'ids' and 'labels'")
  if path.suffix == ".npy":
    try:
      rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"{path}: not a readable .npy ({e}); expected {expected}") from e
    ids, labels = None, None
  else:
    with validation.open_npz(path, expected=f"an .npz of arrays ({expected})") as f:
      arrays = [k for k in f.files if k not in ("ids", "labels")]
      if len(arrays) != 1:
        raise ValueError(f"{path}: expected {expected}; found arrays {sorted(f.files)}")
      rows = f[arrays[0]]
      ids = f["ids"] if "ids" in f.files else None
      labels = f["labels"] if "labels" in f.files else None
  if rows.ndim != 2 or rows.dtype.kind != "f":
    raise ValueError(f"{path}: expected {expected}; found a {rows.dtype} array of shape "
                     f"{rows.shape}")
  n = rows.shape[0]
  for name, extra in (("ids", ids), ("labels", labels)):
    if extra is not None and np.shape(extra) != (n,):
      raise ValueError(f"{path}: '{name}' must have one entry per row ({n}), found shape "
                       f"{np.shape(extra)}")
  return Library(rows, np.arange(n) if ids is None else np.asarray(ids),
                 None if labels is None else np.asarray(labels), _file_origin(path), str(path))


def library_reader(*, modality: str, workdir: str, config: Any, source: str | None = None,
                   tfds: str | None = None, data_dir: str | None = None,
                   split: str | None = None) -> Callable[[], Library]:
  """The items of ``modality`` from ``--source`` / ``--tfds`` (default: the run's dataset), in
  two parts: checks the flags now (a ``cli.UsageError``) and returns what reads the items.

  ``main`` checks, restores the run, then reads: a bad flag is refused before the checkpoint
  is read, and a run that cannot be restored before the data is. A ``--tfds`` dataset is
  opened now (whether its name is a dataset is known only then); its items are read later,
  as the others'. ``workdir``, ``config``: the run and its config (the run's dataset, its
  splits). ``split``: of a paired file, the TFDS dataset or the run's data (default "test");
  refused for a features-only file, which has none.
  """
  from dsf3n_jax import retrieval  # pylint: disable=g-import-not-at-top
  if source and tfds:
    raise cli.UsageError("--source and --tfds: give one of them")
  if data_dir and not tfds:
    raise cli.UsageError(f"--data_dir={data_dir}: read with --tfds only (the TFDS data_dir of "
                         "the dataset it names)")
  if source:
    path = pathlib.Path(source)
    if not path.exists():
      raise cli.UsageError(f"--source={source}: no such file")
    if path.suffix in (".h5", ".hdf5") or (path.suffix == ".npz" and _is_paired(path)):
      split = split or "test"
      retrieval.check_split(path, split, where=f"--source={source}")

      def read_paired(split=split) -> Library:
        visual, audio, labels = retrieval.load_split(path, split)
        rows = visual if modality == "visual" else audio
        return Library(rows, np.arange(len(rows)), labels, _file_origin(path, split=split),
                       f"{path} ({split})")
      return read_paired
    if split is not None:
      raise cli.UsageError(f"--split={split}: --source={source} holds features only (no "
                           "splits); drop --split")
    return lambda: read_features(path, what=f"--source={source}")
  split = split or "test"
  if tfds:
    # load_sources carves no validation split: the name is checked before the dataset is read
    # (or built).
    _check_split_name(split, ("train", "test"), f"--tfds={tfds}")
    sources = _tfds_sources(tfds, data_dir)
    return lambda: Library(None, None, None, {"tfds": tfds, "split": split, **sources.origin},
                           f"--tfds={tfds} ({split})",
                           _split(sources, split, f"--tfds={tfds}"), modality)
  from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
  if not train.has_data(workdir):
    raise cli.UsageError(f"--workdir={workdir}: converted weights, trained on no dataset "
                         "of its config: give the items with --source=FILE or --tfds=NAME")
  _check_split_name(split, ("train", "validation", "test") if config.data.get(
      "validation_fraction") else ("train", "test"), "the run's dataset")

  def read_run_data() -> Library:
    # The run's own data as stored: the embedder standardises it as the run did.
    sources = train.load_data(config, normalize=False)
    return Library(None, None, None, {"run": str(workdir), "split": split},
                   f"the run's {split} split", _split(sources, split, "the run's dataset"),
                   modality)
  return read_run_data


def _tfds_sources(name: str, data_dir: str | None):
  """The splits of the TFDS dataset ``--tfds=name``; a name that is no dataset this process
  can build is a ``cli.UsageError`` naming ``--tfds``."""
  from dsf3n_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.datasets.sources import UnknownDatasetError  # pylint: disable=g-import-not-at-top
  try:
    return input_pipeline.load_sources(name, data_dir=data_dir, flag="--tfds")
  except UnknownDatasetError as e:
    raise cli.UsageError(str(e)) from e


def _check_split_name(split: str, splits: tuple[str, ...], where: str) -> None:
  """``split`` one of ``splits`` (those ``where`` has), checked before its data is read."""
  if split not in splits:
    raise cli.UsageError(f"--split={split}: {where} has no such split; expected one of its "
                         f"splits: {', '.join(splits)}")


def _split(sources, split: str, where: str):
  splits = {"train": sources.train, "validation": sources.validation, "test": sources.test}
  if splits.get(split) is None:
    raise cli.UsageError(f"--split={split}: {where} has no such split; expected one of its "
                         f"splits: {', '.join(k for k, v in splits.items() if v is not None)}")
  return splits[split]


def _is_paired(path: pathlib.Path) -> bool:
  """A paired-feature file (labels ``lab_<split>`` beside the features), not one array of
  features (whatever its name, e.g. ``visual_features``) with optional ids and labels."""
  from dsf3n_jax.datasets import validation  # pylint: disable=g-import-not-at-top
  with validation.open_npz(path) as f:
    return any(k.startswith("lab_") for k in f.files)


# -- building ----------------------------------------------------------------------------------

def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  atomic_file(path, lambda f: np.save(f, array))


def _check_rows(x: np.ndarray, lo: int, where: str, dim: int) -> None:
  if x.shape[1] != dim:
    raise ValueError(f"{where}: expected {dim} features per item (the model's input), found "
                     f"{x.shape[1]}")
  bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if bad.size:
    raise ValueError(f"{where}: row {lo + int(bad[0])} is not finite (NaN or Inf; "
                     f"{bad.size} such rows in rows {lo}-{lo + len(x) - 1})")


def build(out, library: Library, *, modality: str, embed: Callable[[np.ndarray], np.ndarray]
          | None, input_dim: int | None, fingerprint: str | None, protocol: str,
          chunk_size: int = 65536, model: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes the index of ``library`` into ``out`` (resuming a build killed midway).

  ``embed`` None: the library's rows are the embeddings already.

  Returns:
    The manifest.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from dsf3n_jax import knn  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out)
  n = len(library)
  if n == 0:
    raise ValueError(f"{library.where}: the library is empty (0 items)")
  if chunk_size < 1:
    raise cli.UsageError(f"--chunk_size={chunk_size}: expected an int >= 1")
  if library.ids is not None and len(np.unique(library.ids)) != n:
    raise ValueError(f"{library.where}: the ids are not unique")
  out.mkdir(parents=True, exist_ok=True)
  if (out / MANIFEST).exists():
    raise cli.UsageError(f"--out={out}: holds a finished index ({MANIFEST}); pick another "
                         "folder or delete it")
  signature = {"format": FORMAT, "modality": modality, "fingerprint": fingerprint,
               "source": library.origin, "count": n, "chunk_size": int(chunk_size),
               "protocol": protocol}
  pid, count = jax.process_index(), jax.process_count()
  done = _progress(out, signature)
  mine = [i for i in range(-(-n // chunk_size)) if i % count == pid]
  todo = [i for i in mine if i not in done]
  if done:
    log("resuming the build in %s: %d of %d shards done", out, len(done), -(-n // chunk_size))
  t0, embedded = time.time(), 0
  dim = None
  for i in todo:
    lo, hi = i * chunk_size, min(n, (i + 1) * chunk_size)
    rows, ids, labels = library.chunk(lo, hi)
    if embed is not None:
      _check_rows(rows, lo, library.where, input_dim)
      emb = embed(rows)
    else:  # given embeddings: checked as the embeddings are, below
      emb = rows
    if emb.ndim != 2 or emb.shape[0] != hi - lo:
      raise ValueError(f"shard {i} of {library.where}: the embedding has shape {emb.shape} for "
                       f"{hi - lo} items (rows {lo}..{hi - 1})")
    # What every search would refuse (a non-finite row, one whose norm overflows), refused now.
    knn.checked_rows(emb, None, f"shard {i} of {library.where} (rows {lo}..{hi - 1})",
                     first_row=lo)
    dim = emb.shape[1]
    _save_npy(out / f"embeddings-{i:05d}.npy", np.ascontiguousarray(emb, np.float32))
    _save_npy(out / f"ids-{i:05d}.npy", ids)
    if labels is not None:
      _save_npy(out / f"labels-{i:05d}.npy", labels)
    done[i] = {"rows": hi - lo, "dim": int(dim)}
    atomic_write(out / f"progress-{pid}.json",
                 json.dumps({"signature": signature,
                             "done": {str(k): v for k, v in done.items() if k in mine}}))
    embedded += hi - lo
    rate = embedded / max(time.time() - t0, 1e-9)
    left = sum(min(n, (j + 1) * chunk_size) - j * chunk_size for j in todo if j > i)
    log("shard %d: %d/%d items of this process, %.0f items/s, ETA %.0fs", i,
         sum(v["rows"] for k, v in done.items() if k in mine), sum(
             min(n, (j + 1) * chunk_size) - j * chunk_size for j in mine), rate, left / rate)
  if count > 1:
    multihost_utils.sync_global_devices("dsf3n_jax.index: shards written")
  if pid == 0:  # only process 0 reads every process's progress, writes the manifest, cleans up
    done = _progress(out, signature)
    shards = [{"embeddings": f"embeddings-{i:05d}.npy", "ids": f"ids-{i:05d}.npy",
               "labels": f"labels-{i:05d}.npy" if library.has_labels else None,
               "rows": done[i]["rows"]} for i in range(-(-n // chunk_size))]
    dims = {v["dim"] for v in done.values()}
    manifest = {**signature, "dim": int(dims.pop()), "dtype": DTYPE, "shards": shards,
                "model": dict(model or {}), "labels": library.has_labels,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, default=str))
    # Progress files, and the temporary files of writes a kill interrupted (paths.atomic_file).
    for p in [*out.glob("progress-*.json"), *out.glob(paths.TEMPORARY_GLOB)]:
      p.unlink(missing_ok=True)
    log("index of %d %s items (%d-d, %s) written to %s in %.1f s", n, modality,
         manifest["dim"], protocol, out, time.time() - t0)
  if count > 1:
    multihost_utils.sync_global_devices("dsf3n_jax.index: manifest written")
  return json.loads((out / MANIFEST).read_text())


def _progress(out: pathlib.Path, signature: Mapping[str, Any]) -> dict[int, dict[str, int]]:
  """Shards a killed build finished (refusing a folder a build of something else holds)."""
  done = {}
  for path in sorted(out.glob("progress-*.json")):
    try:
      saved = json.loads(path.read_text())
    except ValueError:
      continue  # torn by a kill while it was replaced: its shards are embedded again
    if saved.get("signature") != dict(signature):
      raise cli.UsageError(
          f"--out={out}: holds an unfinished build of another library, model or chunk size "
          f"({path.name}); pick another folder or delete it")
    done.update({int(k): v for k, v in saved["done"].items()
                 if (out / f"embeddings-{int(k):05d}.npy").exists()})
  return done


# -- command line ------------------------------------------------------------------------------

BATCH_SIZE = 1024  # --batch_size's default: items per forward pass
# The flags of a library embedded by a run, refused beside --embeddings (which they would not
# change).
MODEL_FLAGS = ("workdir", "checkpoint", "source", "tfds", "data_dir", "split", "batch_size")


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m dsf3n_jax.index", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="the index folder to write")
  p.add_argument("--modality", required=True, help="visual or audio: what the library holds")
  p.add_argument("--workdir", help="the trained run whose model embeds the library")
  p.add_argument("--checkpoint", choices=("best", "latest"), default=None,
                 help="with --workdir: which of the run's checkpoints embeds, 'best' (the one "
                 "the run selected; default) or 'latest'; search embeds queries with the same")
  p.add_argument("--source", help="paired-feature file, or features-only .npy / .npz")
  p.add_argument("--tfds", help="a TFDS dataset by name (with --split)")
  p.add_argument("--data_dir", help="TFDS data_dir for --tfds")
  p.add_argument("--split", help="split of a paired file, TFDS or the run (default test)")
  p.add_argument("--embeddings", help="embeddings already computed: .npy, or .npz of one array "
                 "(+ ids, labels); no model")
  p.add_argument("--chunk_size", type=int, default=65536, help="items per shard")
  p.add_argument("--batch_size", type=int, default=None,
                 help=f"with --workdir: items per forward pass (default {BATCH_SIZE})")
  p.add_argument("--coordinator_address", help="host:port of process 0 (several hosts; on TPU "
                 "and under SLURM JAX finds it itself)")
  p.add_argument("--num_processes", type=int, help="number of processes (several hosts)")
  p.add_argument("--process_id", type=int, help="this process's index (several hosts)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  modality = check_modality(args.modality)
  cli.check_at_least_one(args, "batch_size", "chunk_size")
  cli.check_out_folder("--out", args.out)
  from dsf3n_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize({}, coordinator_address=args.coordinator_address,
                           num_processes=args.num_processes, process_id=args.process_id,
                           config_keys=False)
  except distributed.SettingsError as e:
    raise cli.UsageError(str(e)) from e
  if args.embeddings:
    given = [f"--{flag}" for flag in MODEL_FLAGS if getattr(args, flag) is not None]
    if given:
      raise cli.UsageError(f"--embeddings: give it alone, without {', '.join(given)} (those "
                           "choose the model and the items it embeds; --embeddings are embedded "
                           "already)")
    path = pathlib.Path(args.embeddings)
    if not path.exists():
      raise cli.UsageError(f"--embeddings={args.embeddings}: no such file")
    library = read_features(path, what=f"--embeddings={args.embeddings}")
    build(args.out, library, modality=modality, embed=None, input_dim=None, fingerprint=None,
          protocol="given", chunk_size=args.chunk_size)
    return 0
  if not args.workdir:
    raise cli.UsageError("--workdir: the trained run to embed with (or --embeddings=FILE)")
  # The run's config.json (a folder that is no run is named now), then the library: a bad
  # --source, --tfds or --split is refused before the checkpoint is read (RunModel.load
  # restores the run: slow for a large model).
  from dsf3n_jax.training import restore  # pylint: disable=g-import-not-at-top
  read_library = library_reader(modality=modality, workdir=args.workdir,
                                config=restore.run_config(args.workdir), source=args.source,
                                tfds=args.tfds, data_dir=args.data_dir, split=args.split)
  checkpoint = args.checkpoint or "best"
  run = RunModel.load(args.workdir, which=checkpoint)
  library = read_library()  # after the restore: a run that cannot be restored reads no data
  build(args.out, library, modality=modality, embed=run.embedder(
      modality, batch_size=args.batch_size or BATCH_SIZE), input_dim=run.input_dim(modality),
        fingerprint=run.fingerprint, protocol="unimodal", chunk_size=args.chunk_size,
        model={"workdir": str(pathlib.Path(args.workdir).resolve()),
               "checkpoint": checkpoint,
               "name": run.model_config.get("name"), "embed_dim": run.model_config.get(
                   "embed_dim")})
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
