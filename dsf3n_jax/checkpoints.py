"""Orbax checkpoints of a training run: the latest ones and the best one.

``workdir/checkpoints/<epoch>`` holds the latest ``keep`` checkpoints and
``workdir/best/<epoch>`` the best one by the selection metric. Each holds
the ``TrainState`` and a JSON ``meta`` item: the resolved model config, the
data iterator's state, the global step and the run's bookkeeping (best so
far, early-stopping counter). Saves are asynchronous and atomic: a run
killed during a save leaves the previous checkpoint as the latest complete
one.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for a different model configuration."""


def _manager(directory: pathlib.Path, keep: int, name: str) -> ocp.CheckpointManager:
  # Each manager needs its own barrier names: two managers saving the same step
  # at once would otherwise collide in the multi-host coordination service.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
  return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpointer:
  """The latest and best checkpoints of one workdir.

  Args:
    workdir: the run's directory.
    keep: number of latest checkpoints kept.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2):
    self.workdir = pathlib.Path(workdir)
    self.latest = _manager(self.workdir / "checkpoints", keep, "latest")
    self.best = _manager(self.workdir / "best", 1, "best")

  def latest_epoch(self) -> int | None:
    return self.latest.latest_step()

  def save(self, epoch: int, state, meta: Mapping[str, Any], *, best: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta)))
    self.latest.save(epoch, args=args, force=True)
    if best:
      self.latest.wait_until_finished()  # one save in flight at a time
      self.best.save(epoch, args=args, force=True)

  def restore(self, abstract_state, *, epoch: int | None = None, which: str = "latest",
              model_config: Mapping[str, Any] | None = None):
    """Restores ``(state, meta)``; checks the model config when given.

    Raises:
      CheckpointMismatchError: naming the differing model fields.
      FileNotFoundError: no checkpoint in the workdir.
    """
    manager = self.latest if which == "latest" else self.best
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no {which} checkpoint under {manager.directory}")
    meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if model_config is not None:
      check_model_config(meta["model"], model_config, where=f"{manager.directory}/{epoch}")
    restored = manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def read_meta(self, *, which: str = "latest", epoch: int | None = None) -> dict[str, Any]:
    manager = self.latest if which == "latest" else self.best
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no {which} checkpoint under {manager.directory}")
    return manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _model_defaults() -> dict[str, Any]:
  from dsf3n_jax.models import DSF3N  # pylint: disable=g-import-not-at-top
  return {f.name: f.default for f in dataclasses.fields(DSF3N)
          if f.default is not dataclasses.MISSING}


def check_model_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, where: str):
  """Raises ``CheckpointMismatchError`` listing every field that differs.

  A field the checkpoint does not record (written before the field existed)
  counts as ``DSF3N``'s default for it.
  """
  diffs = []
  defaults = _model_defaults()
  for key in sorted(set(saved) | set(current)):
    a = saved.get(key, defaults.get(key, "<absent>"))
    b = current.get(key, defaults.get(key, "<absent>"))
    if isinstance(a, (list, tuple)):
      a = list(a)
    if isinstance(b, (list, tuple)):
      b = list(b)
    if a != b:
      diffs.append(f"model.{key}: checkpoint has {a!r}, config has {b!r}")
  if diffs:
    raise CheckpointMismatchError(
        f"checkpoint {where} was written for a different model:\n  " + "\n  ".join(diffs))


def abstract_like(state, mesh: Mesh):
  """Shape/dtype/sharding (replicated over ``mesh``) of ``state``, for restoring."""
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      state)
