"""Search an index (``dsf3n_jax.index``): the k nearest library items of new queries.

Python::

  index = search.Index.load("INDEX")
  hits = index.search(query_embeddings, k=10)           # hits.ids, hits.scores: (n, k)
  hits = index.search(index.embed_queries(audio_features, workdir="RUN"), k=10)

Command line::

  python -m dsf3n_jax.search --index=INDEX --queries=new_audio.npy --workdir=RUN --k=10
  python -m dsf3n_jax.search --index=INDEX --query_embeddings=emb.npy --k=5 --json

Queries are of the other modality than the library (audio queries for a
visual library): new feature vectors (``.npy``, or ``.npz`` of one array)
embedded alone by the run that built the index, which is checked by its
fingerprint, or embeddings (``--query_embeddings``). The search is exact
(``dsf3n_jax.knn``: the index sharded over this host's devices, ties by the
lower row) unless ``--approximate``; scores are cosine similarities. The table
shows each query's hits; ``--json`` writes one JSON line per query:
``{"query": i, "ids": [...], "scores": [...]}`` (plus ``labels`` when the
index has them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
from typing import Any

import numpy as np

from dsf3n_jax import cli, knn
from dsf3n_jax import index as index_lib


class IndexError_(ValueError):  # noqa: N801 - not the builtin IndexError
  """An index folder that cannot be used: missing, truncated, or of another model."""


class IndexUsageError(IndexError_, cli.UsageError):
  """An index the command line cannot use as given (exit status 2): no index at ``--index``,
  or queries it cannot take (another run's model; features for an index of given
  embeddings)."""


@dataclasses.dataclass
class Hits:
  """The k best items of each query, best first."""

  ids: np.ndarray  # (n, k) the items' ids
  scores: np.ndarray  # (n, k) cosine similarity (1 - the metric's cosine distance)
  rows: np.ndarray  # (n, k) row numbers in the index
  labels: np.ndarray | None  # (n, k) the items' labels, when the index has them


@dataclasses.dataclass
class Index:
  """A built index: its manifest and its embeddings (memory-mapped shards)."""

  path: pathlib.Path
  manifest: dict[str, Any]
  shards: tuple[np.ndarray, ...]  # each shard's embeddings, memory-mapped, in row order
  ids: np.ndarray
  labels: np.ndarray | None
  _library: knn.Library | None = None

  @functools.cached_property
  def embeddings(self) -> np.ndarray:
    """All the embeddings (count, dim) in one array: a copy when there are several shards.
    ``search`` does not need it: it places each device's rows from the shards."""
    if len(self.shards) == 1:
      return np.asarray(self.shards[0])
    return np.concatenate(self.shards or [np.zeros((0, self.dim), np.float32)])

  @property
  def count(self) -> int:
    return int(self.manifest["count"])

  @property
  def dim(self) -> int:
    return int(self.manifest["dim"])

  @property
  def modality(self) -> str:
    return self.manifest["modality"]

  @classmethod
  def load(cls, path) -> Index:
    """Reads ``path/manifest.json`` and its shards, checking each shard's rows and size."""
    path = pathlib.Path(path)
    manifest_path = path / index_lib.MANIFEST
    if not manifest_path.is_file():
      if any(path.glob("progress-*.json")):
        raise IndexError_(f"--index={path}: {index_lib.MANIFEST} not found (an unfinished "
                          "build: rerun the same python -m dsf3n_jax.index command to finish it)")
      found = ("no such folder" if not path.exists() else "a file" if not path.is_dir()
               else "not an index folder")
      raise IndexUsageError(f"--index={path}: {index_lib.MANIFEST} not found ({found}); "
                            "expected a folder that python -m dsf3n_jax.index wrote")
    try:
      manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
      raise IndexError_(f"{manifest_path}: not valid JSON ({e})") from e
    if manifest.get("format") != index_lib.FORMAT:
      raise IndexError_(f"{manifest_path}: format {manifest.get('format')!r}, expected "
                        f"{index_lib.FORMAT}")
    parts, ids, labels = [], [], []
    dim = int(manifest["dim"])
    for shard in manifest["shards"]:
      rows = int(shard["rows"])
      parts.append(_shard(path / shard["embeddings"], (rows, dim), np.float32))
      ids.append(_shard(path / shard["ids"], (rows,), None))
      if shard.get("labels"):
        labels.append(_shard(path / shard["labels"], (rows,), None))
    total = sum(len(part) for part in parts)
    if total != manifest["count"]:
      raise IndexError_(f"{manifest_path}: the shards hold {total} rows, the manifest says "
                        f"{manifest['count']}")
    return cls(path, manifest, tuple(parts), np.concatenate(ids),
               np.concatenate(labels) if labels else None)

  def search(self, queries, k: int, *, approximate: bool = False,
             where: str = "queries") -> Hits:
    """The ``k`` nearest items of each query embedding (n, dim); the queries and ``k`` are
    checked (``knn.Library.search``), named by ``where`` and ``--k``."""
    if self._library is None:
      self._library = knn.Library.put(self.shards, where=f"--index={self.path}")
    rows, dist = self._library.search(queries, k, approximate=approximate, where=where,
                                      k_name="--k")
    return Hits(self.ids[rows], 1 - dist, rows,
                None if self.labels is None else self.labels[rows])

  def embed_queries(self, features, *, workdir, batch_size: int = 1024,
                    where: str = "queries") -> np.ndarray:
    """Embeds query features of the other modality with the run that built this index."""
    saved = self.manifest.get("fingerprint")
    if saved is None:
      raise IndexUsageError(f"--index={self.path}: built from given embeddings (no model): "
                            "pass query embeddings (--query_embeddings)")
    # The checkpoint that built the index (indexes from before the choice: the latest).
    run = index_lib.RunModel.load(
        workdir, which=self.manifest.get("model", {}).get("checkpoint", "latest"))
    if run.fingerprint != saved:
      raise IndexUsageError(
          f"--workdir={workdir}: its model (fingerprint {run.fingerprint[:12]}) is not the one "
          f"that built --index={self.path} (fingerprint {saved[:12]}, from "
          f"{self.manifest.get('model', {}).get('workdir', '?')}); embed the queries with that "
          "run, or rebuild the index")
    modality = index_lib.other(self.modality)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != run.input_dim(modality):
      raise ValueError(f"{where}: expected {modality} features of shape (n, "
                       f"{run.input_dim(modality)}) (the model's input), found shape "
                       f"{features.shape}")
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
      raise ValueError(f"{where}: query {int(bad[0])} is not finite (NaN or Inf; {bad.size} "
                       "such queries)")
    return run.embedder(modality, batch_size=batch_size)(features)


def _shard(path: pathlib.Path, shape: tuple[int, ...], dtype) -> np.ndarray:
  """A shard memory-mapped, its shape (and dtype) checked; a short file is named."""
  if not path.is_file():
    raise IndexError_(f"{path}: missing shard of the index")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise IndexError_(f"{path}: truncated or unreadable shard ({path.stat().st_size} bytes; "
                      f"expected {shape[0]} rows of shape {shape[1:]}): {e}") from e
  if array.shape != shape or (dtype is not None and array.dtype != dtype):
    raise IndexError_(f"{path}: expected {dtype or 'rows'} of shape {shape}, found "
                      f"{array.dtype} {array.shape}")
  return array


def _read_array(path, *, flag: str) -> np.ndarray:
  """``.npy``, or ``.npz`` of one array (``--queries`` / ``--query_embeddings``)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise cli.UsageError(f"{flag}={path}: no such file")
  return np.asarray(index_lib.read_features(path, what=f"{flag}={path}").rows)


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m dsf3n_jax.search", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--index", required=True, help="the index folder (python -m dsf3n_jax.index)")
  p.add_argument("--queries", help="query features of the other modality (.npy / .npz)")
  p.add_argument("--workdir", help="the run that built the index (embeds --queries)")
  p.add_argument("--query_embeddings", help="query embeddings (.npy / .npz)")
  p.add_argument("--rows", help="queries are these rows (e.g. 0,1,2) of the run's own --split, "
                 "the other modality's features (with --workdir)")
  p.add_argument("--split", help="the run's split for --rows (default test)")
  p.add_argument("--k", type=int, default=10, help="items per query")
  p.add_argument("--approximate", action="store_true", help="jax.lax.approx_max_k per block")
  p.add_argument("--json", action="store_true", help="one JSON line per query")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  given = [f for f, v in (("--queries", args.queries), ("--query_embeddings",
                                                        args.query_embeddings),
                            ("--rows", args.rows)) if v]
  if len(given) != 1:
    raise cli.UsageError("give one of --queries=FILE (with --workdir), --rows=0,1,... (with "
                         f"--workdir) or --query_embeddings=FILE; got {given or 'none'}")
  if args.split and not args.rows:
    raise cli.UsageError(f"--split={args.split}: only with --rows (the run's rows to query)")
  if args.workdir and args.query_embeddings:
    raise cli.UsageError("--workdir: not used with --query_embeddings (the queries are "
                         "embedded already); drop it, or give --queries=FILE to embed with it")
  index = Index.load(args.index)
  if not 1 <= args.k <= index.count:  # before any query is read or embedded
    raise cli.UsageError(f"--k={args.k}: expected an int from 1 to the {index.count} items "
                         "searched")
  if args.rows:
    args.split = args.split or "test"
    if not args.workdir:
      raise cli.UsageError("--rows: needs --workdir, the run that built the index")
    from dsf3n_jax import retrieval  # pylint: disable=g-import-not-at-top
    from dsf3n_jax.training import restore  # pylint: disable=g-import-not-at-top
    from dsf3n_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    if not workdir_lib.has_data(args.workdir):
      raise cli.UsageError(f"--rows: --workdir={args.workdir} holds converted weights, trained "
                           "on no dataset of its config; give the queries with --queries=FILE")
    arrays = retrieval.run_split(restore.run_config(args.workdir), args.split,
                                 normalize=False)  # embed_queries standardises as the run did
    features = arrays[index_lib.other(index.modality)]
    try:
      rows = [int(r) for r in args.rows.split(",")]
    except ValueError as e:
      raise cli.UsageError(f"--rows={args.rows}: expected row numbers like 0,1,2") from e
    if not all(0 <= r < len(features) for r in rows):
      raise cli.UsageError(f"--rows={args.rows}: expected rows from 0 to {len(features) - 1} "
                           f"of the run's {args.split} split")
    queries = index.embed_queries(features[rows], workdir=args.workdir, where="--rows")
    where = f"--rows={args.rows}"
  elif args.queries:
    if not args.workdir:
      raise cli.UsageError("--queries: needs --workdir, the run that built the index")
    queries = index.embed_queries(_read_array(args.queries, flag="--queries"),
                                  workdir=args.workdir, where=f"--queries={args.queries}")
    where = f"--queries={args.queries}"
  else:
    queries = _read_array(args.query_embeddings, flag="--query_embeddings")
    where = f"--query_embeddings={args.query_embeddings}"
  if len(queries) == 0:
    raise cli.UsageError(f"{where}: no queries (0 rows)")
  hits = index.search(queries, args.k, approximate=args.approximate, where=where)
  for i in range(len(queries)):
    if args.json:
      row = {"query": i, "ids": hits.ids[i].tolist(),
             "scores": [round(float(s), 6) for s in hits.scores[i]]}
      if hits.labels is not None:
        row["labels"] = hits.labels[i].tolist()
      print(json.dumps(row))
      continue
    print(f"query {i}:")
    for rank in range(hits.ids.shape[1]):
      label = f"  label {hits.labels[i, rank]}" if hits.labels is not None else ""
      print(f"  {rank + 1:>3}  id {hits.ids[i, rank]}  score {hits.scores[i, rank]:.4f}{label}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
