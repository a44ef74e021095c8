"""A finished or running training's model back from its workdir; weights written as a run."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsf3n_jax import losses
from dsf3n_jax.checkpoints import FOLDER as CHECKPOINTS
from dsf3n_jax.checkpoints import Checkpointer
from dsf3n_jax.training import workdir as workdir_lib
from dsf3n_jax.training.run import feature_stats, normalize_loss_config
from dsf3n_jax.training.state import (
    abstract_state,
    build_model,
    build_optimizer,
    make_init_fn,
    model_config,
    new_meta,
)
from dsf3n_jax.training.workdir import log


def _run_config(workdir) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  saved = workdir_lib.read_run_config(workdir)
  if saved.get("model_given"):
    raise ValueError(f"{workdir}: the run trained a model given from Python "
                     "(train_and_evaluate(model=...)), which its config.model does not "
                     "describe: build that model and restore its variables with "
                     "checkpoints.Checkpointer, or register it and name it in config.model")
  losses.import_terms(saved.get("loss_terms", {}))  # a user's terms, as the run registered them
  config = ml_collections.ConfigDict(
      {**saved["config"], "loss": normalize_loss_config(saved["config"]["loss"])})
  return config, saved["model"]


def run_config(workdir) -> ml_collections.ConfigDict:
  """The saved config of the run in ``workdir`` (``restore_model``'s third output, without
  reading a checkpoint)."""
  return _run_config(workdir)[0]


def restore_model(workdir, *, which: str = "latest"):
  """Model, variables and config of the run in ``workdir`` (for retrieval and figures).

  Args:
    workdir: a training run's directory.
    which: "latest" or "best" (the checkpoint the run selected: what the command-line tools
      read by default).

  Returns:
    ``(model, {"params", "batch_stats"}, config)`` with ``config`` the run's
    saved ``ConfigDict``.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
  config, mcfg = _run_config(workdir)
  model = build_model(mcfg, axis_name=None)
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, read_only=True)
  try:  # the optimiser's structure does not depend on the schedule's steps per epoch
    # Without shardings: read into host arrays, which the tools use.
    abstract = abstract_state(model, build_optimizer(config, 1),
                              num_classes=mcfg["num_classes"], loss_terms=config.loss.terms)
    state, meta = checkpointer.restore(abstract, which=which, model_config=mcfg,
                                       on_fallback=log)
  finally:
    checkpointer.close()
  best = meta.get("best") or {}
  chosen = (f"the best: epoch {best.get('epoch')}, selected on {best.get('selected_on')} "
            f"{best.get('metric')}" if which == "best" else "the latest")
  log(f"{workdir}: step {meta.get('step')}'s checkpoint ({chosen})")
  return model, jax.device_get(state.variables), config


def save_variables_as_run(workdir, variables: Mapping[str, Any], *,
                          config: ml_collections.ConfigDict,
                          best: Mapping[str, Any] | None = None, no_data: bool = False) -> str:
  """Writes ``variables`` as epoch 0 of a run in ``workdir`` (e.g. converted weights).

  Input sizes and the class count are read off the variables. The result is a
  workdir that ``restore_model`` (retrieval, figures) reads and that
  ``train_and_evaluate`` resumes from, i.e. fine-tunes; the optimiser state is
  fresh and the loss terms' parameters (the centres) are drawn as at
  initialisation.

  ``best`` (``{"selected_on": split, "metric": name, "value": v, ...}``, the variables'
  evaluation): the checkpoint is also the run's best (``--checkpoint=best`` reads it).

  A ``workdir`` that holds a run already (``config.json`` or ``checkpoints/``) is refused
  (``WorkdirError``): nothing of that run is replaced. ``no_data``: the variables were not
  trained on ``config.data`` (converted weights); the tools reading the run then need the
  data named (``workdir.has_data``).

  Returns:
    The checkpoint directory written.
  """
  resolved = workdir_lib.resolve(workdir)
  held = [name for name in (workdir_lib.RUN_FILE, CHECKPOINTS) if (resolved / name).exists()]
  if held:
    raise workdir_lib.WorkdirError(
        f"{resolved}: holds a run already ({', '.join(held)}); expected a new or empty folder "
        "(writing a run there would replace its config and its checkpoints)")
  params = variables["params"]
  mcfg = model_config(config,
                      num_classes=np.shape(params["visual_classifier"]["logits"]["kernel"])[1],
                      visual_dim=np.shape(params["visual_encoder"]["dense"]["kernel"])[0],
                      audio_dim=np.shape(params["audio_encoder"]["dense"]["kernel"])[0])
  model = build_model(mcfg)
  tx = build_optimizer(config, 1)
  # The compiled initialiser training uses (the same draws): op by op, each parameter's draw
  # would compile on its own.
  state = make_init_fn(model, tx, num_classes=mcfg["num_classes"],
                       loss_terms=config.loss.terms)(config.seed)
  template = jax.tree.structure(state.variables)
  given = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if jax.tree.structure(given) != template:
    raise ValueError("variables do not fit the model config: "
                     f"{jax.tree.structure(given)} vs {template}")
  state = state.replace(params=jax.tree.map(jnp.asarray, given["params"]),
                        batch_stats=jax.tree.map(jnp.asarray, given["batch_stats"]))
  workdir = workdir_lib.prepare(workdir)
  workdir_lib.write_run_config(workdir, config, mcfg, {}, no_data=no_data)
  # A run that standardises its features keeps the statistics it was trained with, as a
  # trained run does (its dataset, as ``config`` carves it: the sweep's runs).
  if (stats := feature_stats(config)) is not None:
    workdir_lib.write_feature_stats(workdir, stats)
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    meta = {**new_meta(), "model": mcfg}
    if best is not None:
      meta["best"] = {"epoch": 0, "step": 0, "checkpoint": 0, **best}
    checkpointer.save(0, state, meta)
    checkpointer.wait()
  finally:
    checkpointer.close()
  return str(workdir / CHECKPOINTS / "0")


def default_config() -> ml_collections.ConfigDict:
  """``configs/default.py``'s config, loaded from the source tree."""
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "default.py"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: the configs/ folder of the source tree is "
                            "needed (install with `pip install -e .`)")
  spec = importlib.util.spec_from_file_location("dsf3n_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
