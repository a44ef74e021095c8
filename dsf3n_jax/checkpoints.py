"""Orbax checkpoints of a training run: the latest ones and the best one, in one manager.

``workdir/checkpoints/<step>`` (the global step; runs written before step
checkpoints existed are named by epoch, and still read) is one orbax
``CheckpointManager`` whose preservation policy keeps the latest ``keep``
checkpoints and the best one (a finite evaluation that improved the selection
metric), the one that the newest save's ``meta["best"]["checkpoint"]`` names.
The best checkpoint is an ordinary step of the manager, so when it is also a
latest one the two are the same files.

Each checkpoint holds the ``TrainState`` (without the optimiser state when
``optimizer_state=False``) and a JSON ``meta`` item: the resolved model
config, the data position (epoch, step within it, the streaming loader's
state), the sums of the current epoch's train metrics, the run's bookkeeping
(best so far, early-stopping counter) and what the run was trained on
(dataset fingerprint, loss config). Saves are asynchronous and atomic: a run
killed during a save leaves the previous checkpoint as the latest complete
one. A checkpoint that cannot be read is reported in one line and restoring
falls back to the previous one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax.cli import first_line
from dsf3n_jax.mesh import place
from dsf3n_jax.paths import atomic_write, resolve

_policies = ocp.checkpoint_managers


class _ReadOnlyNotices(logging.Filter):
  """Drops orbax's notices that a read-only manager is read-only (``retrieve``, ``visualize``
  and ``convert`` read runs that way, and printed them at every call)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Given directory is read only")
                or "read_only=True, setting save_interval_steps=0" in message)


logging.getLogger("absl").addFilter(_ReadOnlyNotices())
# 2: the loss terms' parameters under ``aux`` (1: the centres as ``centers``; still read).
FORMAT = 2


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The manager's items: ``state``, a PyTree of arrays, and ``meta``, JSON.

  The state is written as orbax's standard handler writes it (the same files),
  except that a replicated array is written from one device instead of being
  split into one slice per replica: the state is small (the reference model
  with its optimiser state is tens of MB), and the slices cost a device op each,
  seconds per save on a host with several devices, for nothing.
  """
  default = ocp.type_handlers.get_type_handler(jax.Array)
  arrays = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False,
      array_metadata_store=getattr(default, "_array_metadata_store", None))
  types = ocp.type_handlers.create_type_handler_registry(*[
      (ty, arrays if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
      for ty in ocp.type_handlers.supported_types()])
  state = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
  meta = ocp.JsonCheckpointHandler()
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, args, handler in (("state", ocp.args.PyTreeSave, state),
                              ("state", ocp.args.PyTreeRestore, state),
                              ("meta", ocp.args.JsonSave, meta),
                              ("meta", ocp.args.JsonRestore, meta)):
    registry.add(item, args, handler)
  return registry


@dataclasses.dataclass
class _KeepBest:
  """An orbax preservation policy: keeps the checkpoint ``step``, the run's best as the meta of
  its newest save names it. (orbax's ``BestN`` would rank the saves' metrics, which orbax writes
  to disk only with a ``best_fn``: a resumed manager saw none, and let the best go.)"""

  step: int | None = None

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [info.step == self.step for info in checkpoints]


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for a different model configuration."""


class StateStructureError(CheckpointMismatchError):
  """A checkpoint's state has another tree than the config makes (its optimiser's
  transformations or its loss terms' parameters differ); ``meta``: the checkpoint's."""

  def __init__(self, path: str, cause: str, meta: Mapping[str, Any]):
    super().__init__(f"checkpoint {path} holds a state of another structure than the config "
                     f"makes ({cause})")
    self.path, self.cause, self.meta = path, cause, meta


class CheckpointError(RuntimeError):
  """No intact checkpoint could be read."""


# An unreadable checkpoint is kept as ``<step>.unreadable``, a name the manager does not read.
UNREADABLE = "unreadable"


def _on_primary(what: str, fn: Callable[[], Any]) -> None:
  """``fn`` (a change to the checkpoint folder) on process 0 alone, the others waiting; its
  failure is raised on every process (none is left waiting for the others)."""
  error = None
  if jax.process_index() == 0:
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - raised below, after every process knows
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      raise CheckpointError(f"checkpoints: {what} failed on process 0")
  if error is not None:
    raise error


FOLDER = "checkpoints"  # the checkpoints' folder in a workdir (``Checkpointer.directory``)


class Checkpointer:
  """The checkpoints of one workdir.

  Args:
    workdir: the run's directory (any ``etils.epath`` path, e.g. ``gs://``).
    keep: number of latest checkpoints kept (the best one is kept besides).
    optimizer_state: save the optimiser state (needed to resume bit for bit);
      without it a checkpoint holds parameters, BatchNorm statistics, centres,
      step and key, and a resume starts the optimiser afresh.
    read_only: open an existing run without creating anything.
  """

  def __init__(self, workdir, *, keep: int = 2, optimizer_state: bool = True,
               read_only: bool = False):
    self.workdir = resolve(workdir)  # a local path made absolute: orbax requires that
    self.directory = self.workdir / FOLDER
    self.optimizer_state = optimizer_state
    self._best = _KeepBest()
    policy = _policies.AnyPreservationPolicy([_policies.LatestN(keep), self._best])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=_handler_registry())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """The numbers of the checkpoints on disk (global steps; epochs for older runs)."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: Mapping[str, Any]) -> None:
    """Starts an asynchronous save as ``checkpoints/<step>``. The checkpoint that
    ``meta["best"]`` names (this one at a new best) is kept besides the latest ones: the
    manager decides what to delete within this call."""
    if not self.optimizer_state:
      state = state.replace(opt_state=None)
    # A copy: orbax writes the JSON in its background thread, after the loop has gone on
    # changing its own meta (the epoch's metric sums) in place.
    meta = copy.deepcopy({**meta, "optimizer_state": self.optimizer_state, "format": FORMAT})
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    self._best.step = best_checkpoint(meta["best"]) if meta.get("best") else None
    self.manager.save(step, args=args, force=True)

  def rewrite_meta(self, step: int, meta: Mapping[str, Any]) -> None:
    """Replaces the ``meta`` item of the complete checkpoint ``step`` with ``meta`` (as ``save``
    writes it), its state untouched: one file written whole (``paths.atomic_write``), so a
    kill leaves the old meta or the new one, never neither. The checkpoint ``meta["best"]``
    names is then the one kept."""
    self.wait()
    path = self.directory / str(step) / "meta" / "metadata"  # orbax's JSON item: one file
    if not path.exists():
      raise CheckpointError(f"{path}: no meta item to rewrite (expected the JSON file of "
                            f"checkpoint {step}'s meta)")
    meta = {**meta, "optimizer_state": self._meta(step).get("optimizer_state", True),
            "format": FORMAT}
    _on_primary(f"meta of {step}", lambda: atomic_write(path, json.dumps(meta)))
    self._best.step = best_checkpoint(meta["best"]) if meta.get("best") else None

  def set_aside(self, step: int, suffix: str):
    """Renames ``checkpoints/<step>`` to ``<step>.<suffix>`` (``-2``, ``-3``... when taken), a
    name the manager does not read: the step can be saved again and nothing is deleted.
    Returns the new path."""
    names = [f"{step}.{suffix}"] + [f"{step}.{suffix}-{n}" for n in range(2, 1000)]
    target = next(self.directory / n for n in names if not (self.directory / n).exists())
    _on_primary(f"set aside {step}", lambda: (self.directory / str(step)).rename(target))
    self.manager.reload()
    return target

  def read_meta(self, *, which: str = "latest", step: int | None = None) -> dict[str, Any]:
    """The ``meta`` item of one checkpoint (default: the newest readable one)."""
    if step is None:
      step = self.best_step() if which == "best" else self._newest()
    return self._meta(step)

  def restore(self, abstract_state, *, step: int | None = None, which: str = "latest",
              model_config: Mapping[str, Any] | None = None,
              on_fallback: Callable[[str], None] | None = None, repair: bool = False):
    """Restores ``(state, meta)``; checks the model config when given.

    Without ``step``, the newest checkpoint (or the best one) is read; one
    that cannot be read is reported through ``on_fallback`` and the previous
    one is tried (``repair``: the unreadable ones are set aside as
    ``<step>.unreadable``, so that the run can save those steps again). A
    checkpoint saved without optimiser state comes back with ``opt_state=None``.

    Raises:
      CheckpointMismatchError: naming the differing model fields;
        ``StateStructureError``: a state of another tree (optimiser, loss terms).
      CheckpointError: no readable checkpoint.
      FileNotFoundError: no checkpoint in the workdir.
    """
    if step is not None or which == "best":
      step = self.best_step() if step is None else step
      return self._restore(step, abstract_state, model_config)
    candidates = sorted(self.manager.all_steps(), reverse=True)
    if not candidates:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    broken = []
    for step in candidates:
      try:
        restored = self._restore(step, abstract_state, model_config)
      except (CheckpointMismatchError, KeyboardInterrupt):
        raise
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        broken.append((step, first_line(e)))
        if on_fallback is not None:
          on_fallback(f"checkpoint {self.directory}/{step} is unreadable ({first_line(e)}); "
                      "falling back to the one before")
        continue
      if broken and repair:
        for bad, _ in broken:
          kept = self.set_aside(bad, UNREADABLE)
          if on_fallback is not None:
            on_fallback(f"checkpoint {self.directory}/{bad} is kept as {kept}, unread: the "
                        f"run saves step {bad} again")
      return restored
    raise CheckpointError(f"no readable checkpoint under {self.directory}: " + "; ".join(
        f"{number}: {cause}" for number, cause in broken))

  def _newest(self) -> int:
    step = self.manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    return step

  def best_step(self) -> int:
    """The number of the best checkpoint (``best_checkpoint`` of the newest meta)."""
    best = self._meta(self._newest()).get("best")
    if not best:
      raise FileNotFoundError(f"no best checkpoint under {self.directory}: the run has not "
                              "evaluated yet (the latest one: which='latest', on the command "
                              "line --checkpoint=latest)")
    number = best_checkpoint(best)
    if number not in self.manager.all_steps():
      raise CheckpointError(f"the best checkpoint, {self.directory}/{number}, is "
                            "missing (a resume of the run saves it again)")
    return number

  def _meta(self, step: int) -> dict[str, Any]:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{self.directory}/{step}/meta: unreadable checkpoint metadata "
                            f"({first_line(e)})") from e

  def _restore(self, step: int, abstract_state, model_config):
    meta = self._meta(step)
    if model_config is not None:
      check_model_config(meta["model"], model_config, where=f"{self.directory}/{step}")
    if not meta.get("optimizer_state", True):
      abstract_state = abstract_state.replace(opt_state=None)
    if meta.get("format", 1) < FORMAT:
      return self._restore_format_1(step, abstract_state), meta
    # Read once into host arrays, then placed: orbax would read a replicated array once per
    # device it goes to (8 host devices: 3x the time of one read and one placement).
    on_host = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
                           abstract_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(abstract_state, restore_args=on_host),
          meta=ocp.args.JsonRestore()))
    except ValueError as e:  # an intact checkpoint of another state: not a broken file
      if "tree structures do not match" not in str(e):
        raise
      raise StateStructureError(f"{self.directory}/{step}", first_line(e).rstrip(":"),
                                meta) from e
    host = restored["state"]
    shapes = [(np.shape(x), t.shape) for x, t in zip(jax.tree.leaves(host),
                                                     jax.tree.leaves(abstract_state))]
    if any(a != b for a, b in shapes):
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step}: its arrays do not fit the model and loss terms "
          f"of the config (shapes {[a for a, b in shapes if a != b][:3]}, expected "
          f"{[b for a, b in shapes if a != b][:3]})")
    return place(host, abstract_state), restored["meta"]

  def _restore_format_1(self, step: int, abstract_state):
    """A checkpoint from before ``TrainState.aux``: the centres at the top as ``centers``, the
    optimiser groups "net" and "centers". Read without a target, then leaf by leaf into
    today's tree (same leaves, same order: only names of leafless nodes changed)."""
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            self.manager.item_metadata(step)["state"].tree)
    raw = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy)))["state"]
    raw = {**raw, "aux": {"center": raw.pop("centers")}}
    fields = {}
    for field in ("step", "params", "batch_stats", "aux", "opt_state", "rng"):
      target = getattr(abstract_state, field)
      if target is None:
        fields[field] = None
        continue
      leaves, targets = jax.tree.leaves(raw.get(field)), jax.tree.leaves(target)
      if [np.shape(x) for x in leaves] != [t.shape for t in targets]:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} (format 1): its {field} does not fit the "
            f"model and loss terms of the config ({len(leaves)} arrays, {len(targets)} "
            "expected, or other shapes)")
      fields[field] = jax.tree.unflatten(jax.tree.structure(target), [
          jax.device_put(np.asarray(x, t.dtype), t.sharding) for x, t in zip(leaves, targets)])
    return abstract_state.replace(**fields)

  def check_for_errors(self) -> None:
    """Raises the error of a finished asynchronous save that failed (e.g. a full disk)."""
    self.manager.check_for_errors()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def best_checkpoint(best: Mapping[str, Any]) -> int:
  """The checkpoint number of ``meta["best"]``: its step (older runs: its epoch)."""
  return int(best.get("checkpoint", best["epoch"]))


def _model_defaults() -> dict[str, Any]:
  from dsf3n_jax.models import DSF3N  # pylint: disable=g-import-not-at-top
  defaults = {f.name: f.default for f in dataclasses.fields(DSF3N)
              if f.default is not dataclasses.MISSING}
  return {**defaults, "name": "dsf3n"}  # checkpoints from before models had names


def check_model_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, where: str):
  """Raises ``CheckpointMismatchError`` listing every field that differs.

  A field the checkpoint does not record (written before the field existed)
  counts as ``DSF3N``'s default for it; fields of older versions are read as
  their successors (``models.dsf3n.upgrade_fields``).
  """
  from dsf3n_jax.models.dsf3n import resolved_fields  # pylint: disable=g-import-not-at-top
  def flat(fields):  # a part's settings one by one: model.fusion_kw.variant
    out = {}
    for key, value in resolved_fields(fields).items():
      if isinstance(value, Mapping):
        out.update({f"{key}.{k}": v for k, v in value.items()})
      else:
        out[key] = value
    return out
  saved, current = flat(saved), flat(current)
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
