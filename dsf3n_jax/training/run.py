"""What a training run is built from: checked config, data, model, optimiser and mesh."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from dsf3n_jax import config_check, input_pipeline
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
  selection: str  # the split the best checkpoint is selected on
  metric: str  # the average it is selected by
  fingerprint: dict[str, Any]  # what it trains on (stored with every checkpoint)

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def load_data(config: ml_collections.ConfigDict) -> input_pipeline.Sources:
  """The run's sources, checked against the model config."""
  d = config.data
  sources = input_pipeline.load_sources(
      d.name, data_dir=d.data_dir or None, path=d.path or None,
      num_classes=d.num_classes or None, visual_dim=config.model.visual_dim or None,
      audio_dim=config.model.audio_dim or None, validation_fraction=d.validation_fraction,
      validation_seed=d.validation_seed, synthetic=dict(d.synthetic))
  if d.normalize == "standardize":
    sources = input_pipeline.standardize(sources)
  elif d.normalize != "none":
    raise ValueError(f"config.data.normalize: expected 'none' or 'standardize', got "
                     f"{d.normalize!r}")
  return sources


def data_fingerprint(config: ml_collections.ConfigDict,
                     sources: input_pipeline.Sources) -> dict[str, Any]:
  """Name, split sizes, carve, normalisation and origin (a file's SHA-256, or TFDS version)."""
  d = config.data
  fingerprint = {"name": d.name, **sources.origin,
                 "sizes": {s: len(getattr(sources, s)) for s in ("train", "validation", "test")
                           if getattr(sources, s) is not None},
                 "validation_fraction": float(d.validation_fraction),
                 "validation_seed": int(d.validation_seed), "normalize": str(d.normalize)}
  path = epath.Path(d.path) if d.path else None
  if path is not None and path.is_file():
    with path.open("rb") as f:
      fingerprint["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
  return fingerprint


# Loss fields added after checkpoints existed, with the value that trains as before them: a
# checkpoint that lacks one resumes when the config keeps that value.
LOSS_FIELDS_ADDED = {"id_weight": 1.0}


def check_resume(saved: Mapping[str, Any], *, fingerprint: Mapping[str, Any],
                 loss: Mapping[str, Any], where: str) -> None:
  """Refuses a resume on other data or with another loss config, naming both."""
  problems = []
  if "loss" in saved:
    loss = {k: v for k, v in dict(loss).items()
            if k in saved["loss"] or LOSS_FIELDS_ADDED.get(k, object()) != v}
  if "data" in saved and dict(saved["data"]) != dict(fingerprint):
    problems.append(f"data: checkpoint was trained on {saved['data']}, the config gives "
                    f"{dict(fingerprint)}")
  if "loss" in saved and dict(saved["loss"]) != dict(loss):
    problems.append(f"loss: checkpoint was trained with {saved['loss']}, the config has "
                    f"{dict(loss)}")
  if problems:
    raise ResumeMismatchError(
        f"cannot resume {where}: " + "; ".join(problems) + " (a new --workdir starts afresh; "
        "--config.allow_resume_mismatch=True resumes anyway, e.g. to fine-tune)")


def resolve_on_device(value) -> bool:
  """``config.data.on_device``: "auto" (on device except on CPU), "true" or "false"."""
  v = str(value).lower()
  if v == "auto":
    return jax.default_backend() != "cpu"
  if v in ("true", "false"):
    return v == "true"
  raise ValueError(f"config.data.on_device: expected 'auto', 'true' or 'false', got {value!r}")


def prepare_run(config: ml_collections.ConfigDict, workdir=None) -> Run:
  """Every check that needs no compile: the config (all problems at once), workdir, data.

  ``workdir=None``: nothing is written (the run's parts only).
  """
  config_check.validate(config, num_devices=jax.device_count())
  workdir = None if workdir is None else workdir_lib.prepare(workdir)
  sources = load_data(config)
  num_train = len(sources.train)
  if config.batch_size > num_train:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_train} training "
                     f"examples of {sources.name}")
  steps_per_epoch = num_train // config.batch_size
  mcfg = model_config(config, num_classes=sources.num_classes, visual_dim=sources.visual_dim,
                      audio_dim=sources.audio_dim)
  selection = config.selection_split
  if selection == "validation" and sources.validation is None:
    selection = "test"
    if workdir is not None:  # a run that selects checkpoints
      workdir_lib.log("warning: no validation split (config.data.validation_fraction=0): the "
                      "best checkpoint is selected on the test split")
  return Run(config=config, workdir=workdir, sources=sources, mcfg=mcfg,
             model=build_model(mcfg), tx=build_optimizer(config, steps_per_epoch),
             mesh=make_mesh(), steps_per_epoch=steps_per_epoch, selection=selection,
             metric=config.get("selection_metric", "map_average"),
             fingerprint=data_fingerprint(config, sources))
