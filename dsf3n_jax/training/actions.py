"""Periodic actions: what the training loop does between its steps (clu's periodic_actions shape).

The loop (``training.loop``) runs the train step in chunks; a chunk ends at
the next step where some action is due, at an epoch's end, and (with the train
split on device) after ``config.steps_per_call`` steps. After each chunk every
due action is called, in order, with the loop and the global step (the number
of steps taken). Built from the config:

* ``ReportProgress``: a progress line with the rate and ETA every
  ``log_every_steps``.
* ``EpochSummary``: at each epoch's end, the epoch's mean train metrics,
  rate, step time, learning rate and (on accelerators) device memory, to
  ``metrics.jsonl``, TensorBoard and the console.
* ``Evaluate``: one per entry of ``config.evals`` (``dsf3n_jax.evaluators``).
* ``SelectBest``: the best checkpoint and early stopping, from the selection
  evaluator's metric and loss, once this step's evaluations are done.
* ``FinalEvaluations``: at an early stop, the run's final evaluations, before its
  checkpoint (the checkpoint of the last step records its final evaluations).
* ``Checkpoint``: every ``checkpoint_every_steps``, every
  ``checkpoint_every_epochs``, at the end, at a new best and at an early stop.
* ``Profile``: a ``jax.profiler`` trace of steps ``profile_steps`` into
  ``workdir/profile``.

A preemption (``training.preemption``) is handled after the actions of the
step where it is seen: a checkpoint of that step, then the run stops.

A user's action subclasses ``PeriodicAction`` and is passed to
``train_and_evaluate(actions=[...])``; ``loop`` gives it ``state``, ``meta``,
``run``, ``writer`` and ``last_evals``. User actions run after ``FinalEvaluations``
and before ``Checkpoint``: what one keeps in ``loop.meta`` (JSON values, under a key of
its own) is in the checkpoint of its step and comes back on a resume; an attribute of the
action does not. An action with ``after_checkpoint = True`` runs after ``Checkpoint``
instead, for work on the checkpoint just saved (``loop.saved_at``: the step saved at this
boundary, else None; ``loop.checkpointer.directory``); what it keeps in ``meta`` then reaches
the next checkpoint only. ``at_end`` fires at the run's last step, or at the step an early
stop ends it at.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING

import jax

from dsf3n_jax import evaluators as evaluators_lib
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training.workdir import log

if TYPE_CHECKING:
  from dsf3n_jax.training.loop import Loop


class PeriodicAction:
  """Fires after every ``every_steps``-th step (> 0) and, with ``at_end``, after the last
  (the run's last step, or the step an early stop ends it at).

  The loop ends its chunks of steps only where some action's ``next_due`` says: a subclass
  that overrides ``due`` overrides ``next_due`` too, or it is called only at the steps where
  another action stops the loop."""

  name = "action"
  after_checkpoint = False  # a user's action: after the step's checkpoint, not before it

  def __init__(self, *, every_steps: int = 0, at_end: bool = False):
    self.every_steps, self.at_end = int(every_steps), bool(at_end)

  def due(self, step: int, last: int) -> bool:
    return bool(self.every_steps and step % self.every_steps == 0) or (
        self.at_end and step == last)

  def next_due(self, step: int) -> int | None:
    """The first step after ``step`` at which ``due`` may be True (None: none but the end)."""
    return (step // self.every_steps + 1) * self.every_steps if self.every_steps else None

  def firings(self, step: int, last: int) -> int:
    """How many times it fires after ``step`` up to ``last`` (for an ETA)."""
    n = (last // self.every_steps - step // self.every_steps) if self.every_steps else 0
    return n + int(self.at_end and step < last and not (self.every_steps
                                                         and last % self.every_steps == 0))

  def __call__(self, loop: Loop, step: int) -> None:
    raise NotImplementedError

  def close(self, loop: Loop) -> None:
    """Called on every exit path of the run (a profile trace is stopped here)."""


def eta_text(seconds: float | None) -> str:
  """``123s``, or ``-`` before the loop has timed a step after its first (``Loop.eta``)."""
  return "-" if seconds is None else f"{seconds:.0f}s"


def fmt(values, keys) -> str:
  return " ".join(f"{k}={float(values[k]):.4f}" for k in keys if k in values)


TRAIN_KEYS = ("loss", "id", "pair", "center")


class ReportProgress(PeriodicAction):
  """``epoch E step i/N loss=... samples/s ETA`` every ``every_steps`` (the rate of the steps
  since the last line)."""

  name = "progress"

  def __call__(self, loop: Loop, step: int) -> None:
    spe = loop.run.steps_per_epoch
    epoch, within = divmod(step - 1, spe)
    log("epoch %d step %d/%d %s %.1f samples/s ETA %s", epoch + 1, within + 1, spe,
        fmt(loop.last_step_metrics, TRAIN_KEYS), loop.rates(self.name)[0],
        eta_text(loop.eta(step)))


class EpochSummary(PeriodicAction):
  """The epoch's train record: mean metrics, the epoch's own rate and step time (the first
  step a process compiles left out), learning rate, device memory."""

  name = "epoch_summary"

  def __call__(self, loop: Loop, step: int) -> None:
    spe = loop.run.steps_per_epoch
    epoch = math.ceil(step / spe)
    means = loop.epoch_means()
    rate, per_step = loop.rates(self.name)  # this epoch's steps (its compile left out)
    extra = {"epoch": epoch, "samples_per_second": rate, "seconds_per_step": per_step,
             "learning_rate": float(loop.lr(step - 1)), **device_memory()}
    loop.writer.write(step, "train", means, **extra)
    log("epoch %d/%d train %s %.1f samples/s ETA %s", epoch, loop.config.num_epochs,
        fmt(means, (*TRAIN_KEYS, "accuracy_visual", "accuracy_audio")),
        extra["samples_per_second"], eta_text(loop.eta(step)))
    loop.reset_epoch_metrics()


def device_memory() -> dict[str, float]:
  """Bytes in use and peak on this process's first device (absent where not reported: CPU)."""
  stats = None
  with contextlib.suppress(Exception):
    stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return {}
  return {f"device_memory_{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use")
          if k in stats}


class Evaluate(PeriodicAction):
  """One evaluator of ``config.evals``: its metrics written and kept in ``loop.last_evals``."""

  def __init__(self, spec: evaluators_lib.Spec, evaluator, *, every_steps: int):
    super().__init__(every_steps=every_steps, at_end=True)
    self.spec, self.evaluator, self.name = spec, evaluator, spec.name
    self.seconds, self.count = 0.0, 0

  def __call__(self, loop: Loop, step: int) -> None:
    t0 = time.time()
    loop.evaluate(self, step)
    self.seconds += time.time() - t0
    self.count += 1


class SelectBest(PeriodicAction):
  """After this step's evaluations: the best-so-far and early stopping (``loop.select``), when
  the selection evaluator ran (``selection_split="last"``: at the run's last evaluations).

  ``early_stopping=False``: the best only (an evaluation the run's schedule did not make, such
  as the repair of a missing best, does not count toward early stopping)."""

  name = "select_best"

  def __init__(self, *, early_stopping: bool = True):
    super().__init__()
    self.early_stopping = early_stopping

  def due(self, step: int, last: int) -> bool:
    del step, last
    return True

  def __call__(self, loop: Loop, step: int) -> None:
    if (loop.final if loop.run.selection == run_lib.LAST
        else loop.run.selection in loop.last_evals):
      loop.select(step, early_stopping=self.early_stopping)


class FinalEvaluations(PeriodicAction):
  """An early stop's final evaluations (``loop.finish_early``): when ``SelectBest`` stops the
  run at a step that is not its last, every evaluator evaluates it as the run's last, before
  the checkpoint of that step, which records them (a rerun does not make them again)."""

  name = "final_evaluations"

  def due(self, step: int, last: int) -> bool:
    del step, last
    return True  # an early stop is known only at the boundary

  def __call__(self, loop: Loop, step: int) -> None:
    if loop.stopping and not loop.final:
      loop.finish_early(step)


class Checkpoint(PeriodicAction):
  """A checkpoint every ``every_steps`` (the step and epoch settings' steps), at the end, and
  whenever this step's evaluation is a new best or stops the run early."""

  name = "checkpoint"

  def __init__(self, *, every: tuple[int, ...]):
    super().__init__(at_end=True)
    self.every = tuple(e for e in every if e > 0)

  def scheduled(self, step: int, last: int) -> bool:
    return step == last or any(step % e == 0 for e in self.every)

  def due(self, step: int, last: int) -> bool:
    del step, last
    return True  # at every boundary: a new best or an early stop is known only then

  def next_due(self, step: int) -> int | None:
    return min(((step // e + 1) * e for e in self.every), default=None)

  def __call__(self, loop: Loop, step: int) -> None:
    if self.scheduled(step, loop.total) or loop.new_best or loop.stopping:
      loop.save(step)


class Profile(PeriodicAction):
  """A ``jax.profiler`` trace of the steps after ``start`` up to ``stop`` into ``directory``.

  Only in a run that reaches ``start`` from before it: a resume past it traces nothing and
  says so. A ``stop`` past the run's last step is refused before the run starts
  (``run.check_steps``); one past the step an early stop ends at ends the trace there.
  """

  name = "profile"

  def __init__(self, start: int, stop: int, directory):
    super().__init__()
    self.start, self.stop, self.directory = int(start), int(stop), directory
    self.tracing = False

  def due(self, step: int, last: int) -> bool:
    return step == self.start or (self.tracing and step == min(self.stop, last))

  def next_due(self, step: int) -> int | None:
    for at in (self.start, self.stop):
      if step < at:
        return at
    return None

  def begin(self, loop: Loop, step: int) -> None:
    """Starts the trace when the run is at ``start``; a run resumed past it is told that it
    traces nothing (``loop.fit`` calls this before the first step)."""
    if step == self.start and not self.tracing:
      jax.block_until_ready(loop.state)
      jax.profiler.start_trace(str(self.directory))
      self.tracing = True
      log("profiling steps %d-%d into %s", self.start + 1, min(self.stop, loop.total),
          self.directory)
    elif self.start < step < loop.total:
      log("config.profile_steps=(%d, %d): not traced, the run resumes at step %d, after the "
          "profile's start (a trace is taken only by a run that reaches step %d from before "
          "it: a new --workdir, or a later (start, stop))", self.start, self.stop, step,
          self.start)

  def __call__(self, loop: Loop, step: int) -> None:
    if step == self.start:
      self.begin(loop, step)
    elif self.tracing:
      self.close(loop)
      log("profile of steps %d-%d written to %s (tensorboard --logdir %s, Profile tab)",
          self.start + 1, step, self.directory, self.directory)

  def close(self, loop: Loop) -> None:
    if self.tracing:
      self.tracing = False
      jax.block_until_ready(loop.state)
      jax.profiler.stop_trace()
