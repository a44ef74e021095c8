"""Cross-modal retrieval: embed a split, save/load embeddings and variables, blockwise top-k.

Two protocols. ``"unimodal"`` (the default, the one that deploys): each item
is embedded from its own modality alone (``DSF3N.embed_visual`` /
``embed_audio``), so a query needs nothing of the other modality.
``"paired"`` (the paper's): the fusion mixes the two modalities of a pair, so
each item is embedded together with its paired item. Either way a split is
embedded in batches; the last batch is padded and the padding dropped.
Files:
  * embeddings ``.npz``: ``emb_visual`` (n, e), ``emb_audio`` (n, e), ``labels`` (n,),
    ``indices`` (n,) (row numbers in the source split), ``protocol`` (the protocol
    that made them; files without it are "paired").
  * variables ``.npz``: the flattened ``{"params", "batch_stats"}`` pytree with
    '/'-joined keys, plus ``__model__``: the model's keyword arguments as JSON.
  * paired-feature ``.npz`` (docs/data.md): ``visual_<split>``, ``audio_<split>``,
    ``lab_<split>`` (class ids or one-hot rows).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsf3n_jax import cli, input_pipeline, knn, metrics, paths
from dsf3n_jax.datasets import validation
from dsf3n_jax.mesh import make_mesh

_MODEL_KEY = "__model__"
PROTOCOLS = ("unimodal", "paired")
# Pairs per forward pass: the default of the embedding functions and of the retrieve and
# visualize CLIs' --batch_size.
BATCH_SIZE = 256
# What each file should be, for the message when it is not (every .npz: allow_pickle=False).
VARIABLES_EXPECTED = ("a variables .npz of arrays (retrieval.save_variables: '/'-joined keys "
                      "under params/ and batch_stats/)")
EMBEDDINGS_EXPECTED = ("an embeddings .npz of arrays (retrieval.save_embeddings: emb_visual, "
                       "emb_audio, labels, indices, protocol)")


class Embeddings(NamedTuple):
  """Embeddings of a split of pairs, and the protocol that made them."""

  emb_visual: np.ndarray
  emb_audio: np.ndarray
  labels: np.ndarray
  indices: np.ndarray
  protocol: str = "paired"


def check_protocol(protocol: str, *, flag: str = "--protocol") -> str:
  """``protocol`` if it is one of ``PROTOCOLS``; a one-line ``cli.UsageError`` (a
  ``ValueError``) otherwise."""
  if protocol not in PROTOCOLS:
    raise cli.UsageError(f"{flag}={protocol}: expected one of {', '.join(PROTOCOLS)}")
  return protocol


def check_missing_partner(model, variables: Mapping[str, Any], *, source: str) -> None:
  """Raises a one-line ``ValueError`` if ``variables`` lack what ``model.missing_partner``
  needs (``placeholder_*`` params for "learned", ``token_mean_*`` statistics for "mean")."""
  needs = {"learned": ("params", "placeholder_"), "mean": ("batch_stats", "token_mean_")}
  if model.missing_partner not in needs:
    return
  collection, prefix = needs[model.missing_partner]
  missing = [f"{collection}/{prefix}{m}" for m in ("visual", "audio")
             if f"{prefix}{m}" not in variables.get(collection, {})]
  if missing:
    raise ValueError(f"{source}: missing_partner={model.missing_partner!r} needs {missing}, "
                     "which these variables lack; accepted for them: 'self' (or retrain)")


class Retrieved(NamedTuple):
  """Top-k items for each query, nearest first (ties: lower item index first)."""

  indices: np.ndarray    # (n, k) item rows in the retrieval set
  distances: np.ndarray  # (n, k)
  labels: np.ndarray     # (n, k) item labels
  relevant: np.ndarray   # (n, k) bool, item label == query label


def save_variables(path, variables: Mapping[str, Any], *,
                   model_kwargs: Mapping[str, Any] | None = None) -> None:
  """Writes a variables pytree as a flat ``.npz`` ('/'-joined keys), whole or not at all.

  Args:
    path: output file.
    variables: e.g. ``{"params": ..., "batch_stats": ...}``.
    model_kwargs: keyword arguments of ``DSF3N`` to store beside them (JSON).
  """
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
  arrays = {k: np.asarray(v) for k, v in flat.items()}
  if model_kwargs is not None:
    arrays[_MODEL_KEY] = np.asarray(json.dumps(dict(model_kwargs)))
  paths.atomic_savez(path, arrays)


def load_variables(path) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Reads a file written by ``save_variables``.

  Args:
    path: the ``.npz`` file.

  Returns:
    ``(variables, model_kwargs)``; ``model_kwargs`` is None if not stored.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"variables file {path} does not exist")
  flat = validation.read_npz(path, expected=VARIABLES_EXPECTED)
  model_kwargs = None
  if _MODEL_KEY in flat:
    model_kwargs = json.loads(str(flat.pop(_MODEL_KEY)))
  if "params" not in {k.split("/")[0] for k in flat}:
    raise ValueError(f"variables file {path}: expected keys under 'params/', found "
                     f"{sorted(flat)[:5]}")
  variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()},
                                           sep="/")
  return variables, model_kwargs


def as_class_ids(labels, *, name: str = "labels") -> np.ndarray:
  """Checked class ids from ids or one-hot rows (``validation.labels_to_ids``), int64."""
  return validation.labels_to_ids(labels, source="labels", key=name).astype(np.int64)


def load_split(path, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads ``visual_<split>``, ``audio_<split>`` and ``lab_<split>`` from a paired-feature file.

  The one reader of such files (``datasets.validation.read_split``): the
  arrays are checked as the trainer checks them.

  Args:
    path: ``.npz`` (or ``.h5``) file with the paired-feature arrays.
    split: "train" or "test" (any suffix present in the file).

  Returns:
    ``(visual, audio, labels)`` as float32, float32 and int64 numpy arrays.
  """
  return validation.read_split(path, split)


def _splits_of(keys: set[str]) -> list[str]:
  """The splits of a paired-feature file's ``keys``: each ``<split>`` of which it has
  ``visual_<split>``, ``audio_<split>`` and ``lab_<split>``."""
  return sorted({k[len("lab_"):] for k in keys if k.startswith("lab_")
                 and set(validation.split_keys(k[len("lab_"):]).values()) <= keys})


def check_split(path, split: str, *, where: str) -> None:
  """A ``cli.UsageError`` naming ``--split``, ``where`` (the file's flag) and the file's
  splits when the paired-feature file at ``path`` has none of ``split``'s arrays.

  A split the file has only some of the arrays of is left to ``load_split``, which names the
  missing keys (a damaged file, not a bad flag).
  """
  try:
    keys = set(validation.file_keys(path))
  except Exception:  # noqa: BLE001 - not a readable paired-feature file: load_split says why
    return
  if keys & set(validation.split_keys(split).values()):
    return
  splits = ", ".join(_splits_of(keys)) or ("none (a paired-feature file has visual_<split>, "
                                            "audio_<split> and lab_<split>)")
  raise cli.UsageError(f"--split={split}: {where} has no such split (no visual_{split}, "
                       f"audio_{split} or lab_{split}); expected one of its splits: {splits}")


def embed_split(model, variables, visual, audio, labels=None, *, batch_size: int = BATCH_SIZE,
                indices=None, protocol: str = "unimodal") -> Embeddings:
  """Embeds a split with a model in eval mode: the trainer's ``training.steps.embed_split``
  (padded batches over this host's devices), under one protocol.

  Args:
    model: a ``DSF3N`` (or any module with the same methods).
    variables: ``{"params", "batch_stats"}``.
    visual: (n, visual_dim) features.
    audio: (n, audio_dim) features.
    labels: (n,) labels to carry along (zeros if None).
    batch_size: items per forward pass (rounded up to a multiple of the devices).
    indices: (n,) source row numbers (default ``arange(n)``).
    protocol: "unimodal" (each modality alone, as ``embed_visual`` /
      ``embed_audio`` embed it) or "paired" (row i of each modality embedded
      together, the paper's protocol).

  Returns:
    ``Embeddings`` of numpy arrays (at least float32).
  """
  from dsf3n_jax.training import steps  # pylint: disable=g-import-not-at-top
  check_protocol(protocol)
  visual = np.asarray(visual, np.float32)
  audio = np.asarray(audio, np.float32)
  n = len(visual)
  if len(audio) != n:
    raise ValueError(f"visual and audio: expected the same number of rows, got {n} and "
                     f"{len(audio)}")
  labels = np.zeros(n, np.int64) if labels is None else as_class_ids(labels)
  indices = np.arange(n) if indices is None else np.asarray(indices)
  emb_v = emb_a = np.zeros((0, model.embed_dim), np.float32)
  if n:
    mesh = make_mesh(jax.local_devices())
    out = steps.embed_split(
        steps.make_embed_fn(model, mesh, protocol=protocol), variables,
        input_pipeline.ArraySource(visual, audio, labels, indices), mesh=mesh,
        batch_size=-(-batch_size // mesh.size) * mesh.size)
    prefix = steps.PREFIXES[protocol]
    emb_v, emb_a = out[f"{prefix}emb_visual"], out[f"{prefix}emb_audio"]
  for name, emb in (("visual", emb_v), ("audio", emb_a)):
    bad = np.flatnonzero(~np.isfinite(np.asarray(emb)).all(axis=-1))
    if bad.size:
      raise FloatingPointError(
          f"the model gives non-finite {name} embeddings for {bad.size} of {n} items (first: "
          f"row {int(bad[0])}): its variables are not usable (non-finite or diverged weights)")
  return Embeddings(emb_v, emb_a, labels, indices.astype(np.int64), protocol)


def save_embeddings(path, embeddings: Embeddings) -> None:
  """Writes embeddings, labels, source indices and the protocol to ``.npz`` (whole or not at
  all)."""
  paths.atomic_savez(path, embeddings._asdict())


def load_embeddings(path, *, protocol: str | None = None) -> Embeddings:
  """Reads a file written by ``save_embeddings`` (keys ``emb_visual``, ``emb_audio``,
  ``labels``, ``indices``, ``protocol``; ``indices`` defaults to ``arange(n)``,
  ``protocol`` to "paired"). With ``protocol``, a file made under the other one is
  refused."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"embeddings file {path} does not exist")
  with validation.open_npz(path, expected=EMBEDDINGS_EXPECTED) as f:
    missing = [k for k in ("emb_visual", "emb_audio", "labels") if k not in f.files]
    if missing:
      raise KeyError(f"embeddings file {path}: missing {missing}; found {sorted(f.files)}")
    emb_v, emb_a = f["emb_visual"], f["emb_audio"]
    labels = as_class_ids(f["labels"], name=f"{path}:labels")
    indices = f["indices"] if "indices" in f.files else np.arange(len(labels))
    made = str(f["protocol"]) if "protocol" in f.files else "paired"
  if protocol is not None and made != check_protocol(protocol):
    raise cli.UsageError(f"embeddings file {path} was made under --protocol={made}, not "
                     f"--protocol={protocol}; re-embed, or pass --protocol={made}")
  for key, emb in (("emb_visual", emb_v), ("emb_audio", emb_a)):
    if not np.issubdtype(emb.dtype, np.floating) or not np.isfinite(emb).all():
      raise ValueError(f"embeddings file {path}: {key} must be finite floats (found dtype "
                       f"{emb.dtype}{', non-finite values' if emb.dtype.kind == 'f' else ''})")
  if not len(emb_v) == len(emb_a) == len(labels) == len(indices):
    raise ValueError(f"embeddings file {path}: row counts differ: emb_visual {len(emb_v)}, "
                     f"emb_audio {len(emb_a)}, labels {len(labels)}, indices {len(indices)}")
  return Embeddings(emb_v, emb_a, labels, np.asarray(indices, np.int64), made)


def top_k(queries, items, *, k: int, distance: metrics.Distance = "cosine",
          block_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest items of each query: ``dsf3n_jax.knn``'s exact kernel (the index's search).

  Args:
    queries: (n, d) embeddings.
    items: (m, d) embeddings.
    k: items per query (clipped to m).
    distance: "cosine" or "euclidean".
    block_size: queries per call.

  Returns:
    ``(distances, indices)``, each (n, min(k, m)), nearest first (cosine
    distance: 1 - similarity); equal distances are ordered by item index, as in
    ``metrics``.
  """
  queries = np.asarray(queries, np.float32)
  items = np.asarray(items, np.float32)
  if k < 1:
    raise ValueError(f"k: expected a positive int, got {k}")
  k = min(k, len(items))
  library = knn.Library.put(items, distance=distance, mesh=make_mesh(jax.local_devices()))
  pos, dist = library.search(queries, k, query_block=block_size)
  return dist, pos


def retrieve(queries, items, query_labels, item_labels, *, k: int = 5,
             distance: metrics.Distance = "cosine", block_size: int = 256) -> Retrieved:
  """Top-k items of the other modality for each query, with distances and labels.

  Args:
    queries: (n, d) query embeddings.
    items: (m, d) retrieval-set embeddings.
    query_labels: (n,) query class ids.
    item_labels: (m,) item class ids.
    k: items per query.
    distance: "cosine" or "euclidean".
    block_size: queries per block.

  Returns:
    ``Retrieved`` with (n, k) arrays.
  """
  query_labels = as_class_ids(query_labels, name="query_labels")
  item_labels = as_class_ids(item_labels, name="item_labels")
  dist, idx = top_k(queries, items, k=k, distance=distance, block_size=block_size)
  labels = item_labels[idx]
  return Retrieved(idx, dist, labels, labels == query_labels[:, None])


def embeddings_from_args(*, workdir=None, embeddings=None, variables=None, data=None,
                         split: str = "test", batch_size: int = BATCH_SIZE,
                         model_kwargs: Mapping[str, Any] | None = None,
                         protocol: str = "unimodal",
                         check_rows: Callable[[int], None] | None = None,
                         data_with_embeddings: bool = False,
                         checkpoint: str = "best") -> Embeddings:
  """Embeddings from one of the three inputs the CLIs accept.

  Args:
    workdir: training directory; uses ``dsf3n_jax.train.restore_model``.
    embeddings: precomputed embeddings ``.npz``.
    variables: variables ``.npz`` (with ``data``).
    data: paired-feature file (with ``variables`` or ``workdir``; for ``workdir``
      defaults to the config's data file).
    split: split of the data file to embed.
    batch_size: pairs per forward pass.
    model_kwargs: ``DSF3N`` arguments overriding those stored with ``variables``.
    protocol: "unimodal" or "paired" (see ``embed_split``); an embeddings file
      made under the other protocol is refused.
    check_rows: called with the split's item count before anything is embedded
      (e.g. to check requested rows; it raises to stop).
    data_with_embeddings: the caller reads ``data`` beside ``embeddings`` (visualize's raw
      features); otherwise ``data`` (or ``model_kwargs``) with ``embeddings`` is an error.
    checkpoint: with ``workdir``, "best" (the checkpoint the run selected) or "latest".

  Returns:
    ``Embeddings``.

  Raises:
    cli.UsageError: (a ``ValueError``) the arguments do not go together, a file named is not
      there, or ``split`` is not one of the data's; other errors are the files' contents.
  """
  check_protocol(protocol)
  given = [name for name, v in (("--workdir", workdir), ("--embeddings", embeddings),
                                ("--variables", variables)) if v]
  if len(given) != 1:
    raise cli.UsageError(f"expected exactly one of --workdir, --embeddings, --variables; got "
                         f"{given or 'none'}")
  check_rows = check_rows or (lambda n: None)
  if embeddings:
    unused = [flag for flag, v in (("--model_kwargs", model_kwargs),
                                   ("--data", None if data_with_embeddings else data)) if v]
    if unused:
      raise cli.UsageError(f"{', '.join(unused)}: not read with --embeddings (the embeddings "
                           "are used as they are); drop it, or embed with --workdir or "
                           "--variables")
  if variables and not data:
    raise cli.UsageError("--variables needs --data=FILE.npz (the paired-feature file)")
  cli.check_files(("--embeddings", embeddings), ("--variables", variables), ("--data", data))
  if data and not embeddings:  # before a model is read
    check_split(data, split, where=f"--data={data}")
  if embeddings:
    emb = load_embeddings(embeddings, protocol=protocol)
    check_rows(len(emb.labels))
    return emb
  from dsf3n_jax.models import DSF3N  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.models.dsf3n import upgrade_fields  # pylint: disable=g-import-not-at-top
  if workdir:
    from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
    # Names a missing run, or a missing best checkpoint.
    model, model_vars, config = train.restore_model(workdir, which=checkpoint)
    source = f"--workdir={workdir}"
    if data is None and not train.has_data(workdir):
      raise cli.UsageError(f"--workdir={workdir}: converted weights, trained on no dataset of "
                           "its config: name the data to embed with --data=FILE (a "
                           "paired-feature file)")
    if data is None:  # the run's own dataset, with its normalisation
      arrays = run_split(config, split)
      check_rows(len(arrays["label"]))
      return embed_split(model, model_vars, arrays["visual"], arrays["audio"], arrays["label"],
                         batch_size=batch_size, indices=arrays["index"], protocol=protocol)
  else:
    model_vars, stored = load_variables(variables)
    kwargs = dict(stored or {})
    kwargs.update(model_kwargs or {})
    if "num_classes" not in kwargs:
      raise cli.UsageError(f"--variables={variables}: no stored model arguments; pass the "
                           "model's arguments (at least num_classes) with --model_kwargs")
    model = DSF3N(**upgrade_fields(kwargs))  # a file of an older version too
    source = f"--variables={variables}"
  check_missing_partner(model, model_vars, source=source)
  visual, audio, labels = load_split(data, split)
  if workdir:  # the file's features as the run's own were standardised for training
    stats = train.feature_stats(config, workdir)
    if stats is not None:
      from dsf3n_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      visual = input_pipeline.standardized(visual, stats["visual"])
      audio = input_pipeline.standardized(audio, stats["audio"])
  check_rows(len(labels))
  return embed_split(model, model_vars, visual, audio, labels, batch_size=batch_size,
                     protocol=protocol)


def embeddings_from_flags(args, *, check_rows: Callable[[int], None] | None = None,
                          data_with_embeddings: bool = False) -> Embeddings:
  """``embeddings_from_args`` from the flags the retrieve and visualize CLIs share."""
  if args.checkpoint is not None and not args.workdir:
    raise cli.UsageError(f"--checkpoint={args.checkpoint}: read with --workdir only (which of "
                         "the run's checkpoints)")
  if args.batch_size is not None and args.embeddings:
    raise cli.UsageError(f"--batch_size={args.batch_size}: not read with --embeddings (they "
                         "are embedded already)")
  return embeddings_from_args(
      workdir=args.workdir, embeddings=args.embeddings, variables=args.variables,
      data=args.data, split=args.split, batch_size=args.batch_size or BATCH_SIZE,
      model_kwargs=model_kwargs_flag(args.model_kwargs, embeddings=args.embeddings),
      protocol=args.protocol, check_rows=check_rows, data_with_embeddings=data_with_embeddings,
      checkpoint=args.checkpoint or "best")


CHECKPOINT_HELP = ("with --workdir: which of the run's checkpoints, 'best' (the one the run "
                   "selected; default) or 'latest'")


def model_kwargs_flag(text: str | None, *, embeddings: str | None = None) -> dict | None:
  """``--model_kwargs``: a JSON object of ``DSF3N`` fields (None when not given)."""
  if not text:
    return None
  if embeddings:
    return text  # refused beside --embeddings by embeddings_from_args, which names both
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise cli.UsageError(f"--model_kwargs={text}: not JSON ({e})") from None
  if not isinstance(value, dict):
    raise cli.UsageError(f"--model_kwargs={text}: expected a JSON object of DSF3N fields, got "
                     f"{type(value).__name__}")
  from dsf3n_jax.models import DSF3N, registry  # pylint: disable=g-import-not-at-top
  from dsf3n_jax.models.dsf3n import upgrade_fields  # pylint: disable=g-import-not-at-top
  known = set(registry.model_fields(DSF3N))
  unknown = sorted(set(upgrade_fields(value)) - known)
  if unknown:
    raise cli.UsageError(f"--model_kwargs: unknown DSF3N field(s) {unknown}; expected some of "
                     f"{sorted(known)}")
  return value


def run_split(config, split: str = "test", *, normalize: bool = True) -> dict[str, np.ndarray]:
  """A split of a training run's dataset, as the run saw it (``train.load_data``).

  Args:
    config: the run's config (``train.restore_model``'s third output).
    split: "train", "validation" or "test".
    normalize: False: the features as stored, not as the run standardised them (for a
      model that standardises its inputs itself, e.g. ``index.RunModel``'s embedder).

  Returns:
    ``{"visual", "audio", "label", "index"}`` numpy arrays.
  """
  from dsf3n_jax import input_pipeline, train  # pylint: disable=g-import-not-at-top
  sources = train.load_data(config, normalize=normalize)
  source = {"train": sources.train, "validation": sources.validation,
            "test": sources.test}.get(split)
  if source is None:
    raise cli.UsageError(f"--split={split}: the run's dataset {sources.name} has no such split "
                     "(train, test, and validation when config.data.validation_fraction > 0)")
  return input_pipeline.load_split_arrays(source)
