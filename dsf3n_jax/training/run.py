"""What a training run is built from: checked config, data, model, optimiser and mesh."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from dsf3n_jax import config_check, input_pipeline, losses
from dsf3n_jax.mesh import DATA_AXIS as AXIS
from dsf3n_jax.mesh import make_mesh
from dsf3n_jax.models import DSF3N
from dsf3n_jax.training import workdir as workdir_lib
from dsf3n_jax.training.state import build_model, build_optimizer, model_config


class ResumeMismatchError(ValueError):
  """The workdir's checkpoints were trained on other data or with another loss config."""

  exit_status = 2


@dataclasses.dataclass
class Run:
  """A run's fixed parts, resolved and checked before anything compiles."""

  config: ml_collections.ConfigDict
  workdir: epath.Path | None  # None: a run that writes nothing (training.seeds)
  sources: input_pipeline.Sources
  mcfg: dict[str, Any]
  model: DSF3N
  tx: optax.GradientTransformation
  mesh: Mesh
  steps_per_epoch: int
  selection: str  # the evaluator (config.evals) the best checkpoint is selected on
  metric: str  # its metric the best checkpoint is selected by
  fingerprint: dict[str, Any]  # what it trains on (stored with every checkpoint)
  loss_fn: losses.LossFn | None = None  # None: the terms of config.loss
  model_given: bool = False  # a model given from Python, which config.model does not describe

  @functools.cached_property
  def eval_loss_fn(self) -> losses.LossFn:
    """The loss every evaluation computes: one function per run, so its compiled form is
    reused (``steps.loss_metrics``)."""
    return self.loss_fn or losses.loss_from_config(self.config.loss)

  @property
  def mode(self) -> str:
    """``"max"`` or ``"min"``: the best value of ``metric`` (``selection_mode_of``)."""
    return selection_mode_of(self.config, self.metric)

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def load_data(config: ml_collections.ConfigDict, *,
              normalize: bool = True) -> input_pipeline.Sources:
  """The run's sources, checked against the model config: normalised as ``config.data``
  says (``normalize=False``: the features as stored, e.g. for a model that standardises
  them itself, ``feature_stats``)."""
  d = config.data
  sources = input_pipeline.load_sources(
      d.name, data_dir=d.data_dir or None, path=d.path or None,
      num_classes=d.num_classes or None, visual_dim=config.model.visual_dim or None,
      audio_dim=config.model.audio_dim or None, validation_fraction=d.validation_fraction,
      validation_seed=d.validation_seed,
      validation_groups=d.get("validation_groups", "none"), synthetic=dict(d.synthetic))
  if d.normalize not in ("none", "standardize"):
    raise ValueError(f"config.data.normalize: expected 'none' or 'standardize', got "
                     f"{d.normalize!r}")
  if normalize and d.normalize == "standardize":
    sources = input_pipeline.standardize(sources)
  return sources


def feature_stats(config: ml_collections.ConfigDict, workdir=None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
  """``{"visual": (mean, std), "audio": ...}`` of the run's train split, which its model was
  trained on features standardised with (``data.normalize="standardize"``); None when it
  was not. Features of the same kind from elsewhere must be standardised with these.

  ``workdir``: the run's, whose ``feature_stats.npz`` (written when it trained) holds them, so
  that its dataset is not needed; a run without the file has them computed from the dataset.
  """
  if config.data.get("normalize", "none") != "standardize":
    return None
  stats = None if workdir is None else workdir_lib.read_feature_stats(workdir)
  return load_data(config).train.stats if stats is None else stats


def data_fingerprint(config: ml_collections.ConfigDict,
                     sources: input_pipeline.Sources) -> dict[str, Any]:
  """Name, split sizes, carve, normalisation and origin (a file's SHA-256, or TFDS version)."""
  d = config.data
  fingerprint = {"name": d.name, **sources.origin,
                 "sizes": {s: len(getattr(sources, s)) for s in ("train", "validation", "test")
                           if getattr(sources, s) is not None},
                 "validation_fraction": float(d.validation_fraction),
                 "validation_seed": int(d.validation_seed), "normalize": str(d.normalize)}
  if d.get("validation_groups", "none") != "none":  # (absent: runs before it existed)
    fingerprint["validation_groups"] = str(d.validation_groups)
  path = epath.Path(d.path) if d.path else None
  if path is not None and path.is_file():
    with path.open("rb") as f:
      fingerprint["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
  return fingerprint


def normalize_loss_config(loss: Mapping[str, Any]) -> dict[str, Any]:
  """A saved ``config.loss`` in today's form (terms by name).

  Checkpoints written before ``loss.terms`` existed hold ``alpha``, ``beta``,
  ``id_weight`` (absent before it existed: 1) and ``unimodal_alpha`` /
  ``unimodal_beta`` (negative: as in the paired loss); they become
  ``terms.{pair,center,id}`` and ``unimodal_terms``.
  """
  loss = dict(loss)
  if "terms" in loss:
    return loss
  terms = {"id": float(loss.pop("id_weight", 1.0)), "pair": float(loss.pop("alpha")),
           "center": float(loss.pop("beta"))}
  unimodal = {}
  for old, name in (("unimodal_alpha", "pair"), ("unimodal_beta", "center")):
    value = float(loss.pop(old, -1.0))
    if value >= 0:
      unimodal[name] = value
  return {**loss, "terms": terms, "unimodal_terms": unimodal}


def check_resume(saved: Mapping[str, Any], *, fingerprint: Mapping[str, Any],
                 loss: Mapping[str, Any], where: str) -> None:
  """Refuses a resume on other data or with another loss config, naming both."""
  problems = []
  if "data" in saved and dict(saved["data"]) != dict(fingerprint):
    problems.append(f"data: checkpoint was trained on {saved['data']}, the config gives "
                    f"{dict(fingerprint)}")
  if "loss" in saved and normalize_loss_config(saved["loss"]) != normalize_loss_config(loss):
    problems.append(f"loss: checkpoint was trained with {normalize_loss_config(saved['loss'])}, "
                    f"the config has {normalize_loss_config(loss)}")
  if problems:
    raise ResumeMismatchError(
        f"cannot resume {where}: " + "; ".join(problems) + " (a new --workdir starts afresh; "
        "--config.allow_resume_mismatch=True resumes anyway, e.g. to fine-tune)")


def schedule_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint records of the run's schedule: batch size, the data's order (seed,
  shuffle), epochs, optimiser."""
  return {"batch_size": int(config.batch_size), "seed": int(config.seed),
          "data.shuffle": bool(config.data.shuffle), "num_epochs": int(config.num_epochs),
          **{f"optim.{k}": v for k, v in config.optim.to_dict().items()}}


# Changes a resume refuses unless allow_resume_mismatch: what they would change.
_ORDER_FIELDS = {"batch_size": "the steps per epoch and the data position",
                 "seed": "the order of the examples", "data.shuffle": "the order of the examples"}


def saved_schedule(meta: Mapping[str, Any]) -> dict[str, Any] | None:
  """A checkpoint's ``schedule_record``; one from before it recorded the data's order gives its
  streamed loader's seed and shuffle (``meta["loader"]``) instead."""
  schedule = dict(meta.get("schedule") or {})
  loader = meta.get("loader") or {}
  for key, field, kind in (("seed", "seed", int), ("data.shuffle", "shuffle", bool)):
    if key not in schedule and field in loader:
      schedule[key] = kind(loader[field])
  return schedule or None


def check_schedule(saved: Mapping[str, Any] | None, config: ml_collections.ConfigDict, *,
                   where: str) -> list[str]:
  """The schedule changes of a resume (``schedule_record`` of the checkpoint and the config).

  A changed batch size, seed or ``data.shuffle`` is refused (``ResumeMismatchError``, naming
  both; the data position or order would change) unless ``allow_resume_mismatch``; the other
  changes (more epochs, another learning rate or schedule) are returned, to be said. A
  checkpoint from before a field was recorded: no change of it known.
  """
  if not saved:
    return []
  now = schedule_record(config)
  changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
  refused = [f"{k}: checkpoint was trained with {saved[k]!r}, the config has {now[k]!r} "
             f"({what} would change)" for k, what in _ORDER_FIELDS.items()
             if k in saved and saved[k] != now[k]]
  if refused and not config.get("allow_resume_mismatch", False):
    raise ResumeMismatchError(
        f"cannot resume {where}: " + "; ".join(refused) + " (a new --workdir starts afresh; "
        "--config.allow_resume_mismatch=True resumes anyway)")
  return changed


def resolve_on_device(value) -> bool:
  """``config.data.on_device``: "auto" (on device except on CPU), "true" or "false"."""
  v = str(value).lower()
  if v == "auto":
    return jax.default_backend() != "cpu"
  if v in ("true", "false"):
    return v == "true"
  raise ValueError(f"config.data.on_device: expected 'auto', 'true' or 'false', got {value!r}")


def prepare_run(config: ml_collections.ConfigDict, workdir=None, *, model=None,
                loss_fn: losses.LossFn | None = None) -> Run:
  """Every check that needs no compile: the config (all problems at once), data, workdir.

  A workdir that cannot be made or written (a parent that is a file, a folder without write
  permission) is refused before the data is read (``workdir.check_writable``); it is created
  (and checked to be writable) last, so a config or data error leaves nothing behind.
  ``workdir=None``: nothing is written (the run's parts only). ``model`` and ``loss_fn``: as
  ``train_and_evaluate`` takes them.
  """
  config_check.validate(config, num_devices=jax.device_count())
  if workdir is not None:  # before the data is read, which may take long
    workdir_lib.check_writable(workdir)
  sources = load_data(config)
  num_train = len(sources.train)
  if config.batch_size > num_train:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_train} training "
                     f"examples of {sources.name}")
  steps_per_epoch = num_train // config.batch_size
  if workdir is not None:  # a run that profiles (into its workdir)
    check_steps(config, steps_per_epoch)
  mcfg = model_config(config, num_classes=sources.num_classes, visual_dim=sources.visual_dim,
                      audio_dim=sources.audio_dim)
  selection, metric = selection_of(config)
  module = build_model(mcfg) if model is None else _mapped(model)
  tx, mesh = build_optimizer(config, steps_per_epoch), make_mesh()
  fingerprint = data_fingerprint(config, sources)
  workdir = None if workdir is None else workdir_lib.prepare(workdir)  # last: nothing fails after
  if selection == "validation" and sources.validation is None:
    selection = "test"
    if workdir is not None:  # a run that selects checkpoints
      workdir_lib.log("warning: no validation split (config.data.validation_fraction=0): the "
                      "best checkpoint is selected on the test split")
  return Run(config=config, workdir=workdir, sources=sources, mcfg=mcfg, model=module, tx=tx,
             mesh=mesh, steps_per_epoch=steps_per_epoch, selection=selection, metric=metric,
             fingerprint=fingerprint, loss_fn=loss_fn, model_given=model is not None)


def check_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """The config's step settings against the run's last step (``num_epochs`` epochs of
  ``steps_per_epoch``), known once the data is read: ``profile_steps`` must name steps the
  run takes (a ``ConfigError`` naming the key, its value and the last step)."""
  total = int(config.num_epochs) * steps_per_epoch
  steps = tuple(int(s) for s in (config.get("profile_steps", ()) or ()))
  if steps and steps[1] > total:
    epochs = f"{config.num_epochs} epoch{'s' if config.num_epochs != 1 else ''}"
    raise config_check.ConfigError([
        f"config.profile_steps={steps}: expected (start, stop) with stop <= {total}, the "
        f"run's last step ({epochs} of {steps_per_epoch} steps); found stop {steps[1]}"
        + (" (no step of the run would be traced)" if steps[0] >= total else "")])


LAST = "last"  # config.selection_split: the final state is the best, nothing is selected


def selection_of(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """``(evaluator, metric)`` the best checkpoint is selected by.

  ``config.selection_metric`` is ``"<eval name>/<metric>"``, or a metric of the
  evaluator named as ``config.selection_split`` (today's default:
  ``map_average`` of ``validation``). ``selection_split="last"``: ``("last", metric)``,
  no evaluator selects (the final state is the best; the metric only tells intermediate
  evaluations which protocol to compute).
  """
  metric = config.get("selection_metric", "map_average")
  if config.get("selection_split") == LAST:
    return LAST, metric.rsplit("/", 1)[-1]
  if "/" in metric:
    name, metric = metric.split("/", 1)
    return name, metric
  return config.get("selection_split", "validation"), metric


def selection_mode_of(config: ml_collections.ConfigDict, metric: str) -> str:
  """``"max"`` or ``"min"``: whether the highest or the lowest ``metric`` (``selection_of``'s)
  is the best. ``config.selection_mode="auto"``: min for a loss (``loss``, ``*_loss``)."""
  mode = config.get("selection_mode", "auto")
  if mode == "auto":
    return "min" if metric == "loss" or metric.endswith("_loss") else "max"
  return mode


def _mapped(model):
  """A user's model with BatchNorm statistics over the data axis (as ``build_model`` sets)."""
  if not hasattr(model, "axis_name"):
    raise TypeError(f"model: expected a module with an axis_name field (as DSF3N), got "
                    f"{type(model).__name__}")
  return model.clone(axis_name=AXIS)
