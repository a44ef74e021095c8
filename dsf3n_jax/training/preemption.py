"""Preemption: SIGTERM / SIGINT (and JAX's preemption notice) become a save at a step boundary.

Spot and preemptible VMs, SLURM's ``--signal`` and Kubernetes send SIGTERM,
then SIGKILL a while later. ``PreemptionWatch`` turns the first signal into a
request that the training loop sees at its next step boundary: it saves a
checkpoint there, closes everything and ends with ``Preempted``, whose exit
status (``EXIT_STATUS``, 75: sysexits' EX_TEMPFAIL, "try again") tells a
scheduler to requeue the job. Rerunning the same command resumes.

One process: Python handlers for SIGTERM and SIGINT set a flag. A further
signal before or while the run saves is logged and ignored (orbax's saves are
atomic, so even a SIGKILL then leaves the previous checkpoint intact).

Start-up: ``python -m dsf3n_jax.main`` records the signals from its first line
(``watch_from_start``), so one that arrives while the run imports, reads its data
or restores its checkpoint stops it before its first step, with the same exit
status (nothing new to save: a rerun resumes from the checkpoint it restored); a
second one then goes to the handler from before (Ctrl-C twice ends a start that
hangs on a coordinator).

Several processes (``jax.distributed``): every process must stop at the same
step. JAX's preemption service catches SIGTERM itself (its handler is
installed by ``jax.distributed.initialize``) and tells every process through
the coordination service; ``multihost_utils.reached_preemption_sync_point`` is
then True on all of them at the same boundary. SIGINT is turned into a SIGTERM
of this process, so it takes the same path. The boundaries are counted (0, 1,
2, ...), not named by their training step: the protocol picks "the largest id
seen + 1", which is a boundary only when consecutive boundaries have
consecutive ids.
"""

from __future__ import annotations

import os
import signal
import threading

# No jax at import: ``main`` records the start-up's signals (``watch_from_start``) before jax
# is imported.


def log(msg: str, *args) -> None:
  from dsf3n_jax.training.workdir import log as workdir_log  # pylint: disable=g-import-not-at-top
  workdir_log(msg, *args)

EXIT_STATUS = 75  # EX_TEMPFAIL: the run was stopped with a checkpoint saved; rerun to resume
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_DEFAULT_HANDLERS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
_early: list[str] = []  # signals that arrived before a PreemptionWatch took over
_before_start: dict[int, object] = {}  # the handlers watch_from_start replaced


def _original(sig: int):
  """The handler ``sig`` had before ``watch_from_start`` (Python's default when unknown)."""
  handler = _before_start.get(sig)
  return _DEFAULT_HANDLERS[sig] if handler is None else handler


def _record_early(signum, frame) -> None:
  """The first signal is recorded (the ``PreemptionWatch`` that takes over acts on it); a
  second goes to the handler from before, so Ctrl-C twice stops a start that hangs (a
  coordinator that never answers)."""
  name = signal.Signals(signum).name
  if not _early:
    _early.append(name)
    os.write(2, f"{name} received while starting: the run stops before its first step (a "
                f"second one stops it now)\n".encode())
    return
  previous = _original(signum)
  signal.signal(signum, previous)
  if callable(previous):
    previous(signum, frame)
  elif previous == signal.SIG_DFL:
    signal.raise_signal(signum)


def watch_from_start() -> None:
  """Records SIGTERM / SIGINT from now on until a ``PreemptionWatch`` is entered, which then
  stops the run before its first step (main thread only; elsewhere nothing changes)."""
  if threading.current_thread() is threading.main_thread():
    for sig in _SIGNALS:
      previous = signal.signal(sig, _record_early)
      if previous is not _record_early:
        _before_start[sig] = previous


def _take_early() -> str | None:
  """The first signal ``watch_from_start`` recorded (None if none), forgotten."""
  early = _early[0] if _early else None
  _early.clear()
  return early


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked
  """The run saved a checkpoint at a step boundary and stopped on a preemption signal."""

  exit_status = EXIT_STATUS

  def __init__(self, message: str, *, step: int):  # the step a rerun resumes from
    super().__init__(message)
    self.step = step


def _distributed() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


def _sync_manager():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager


class PreemptionWatch:
  """Context manager: installs the handlers; ``requested()`` at each step boundary.

  Handlers can only be installed from the main thread; elsewhere (a run
  started from a worker thread) the watch is inert and says so.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self.saving = False
    self._previous: dict[int, object] = {}
    # JAX's sync point is the largest id the processes reported + 1, a process that has not
    # asked yet reporting 0: ids from 1 make a notice from before the first boundary stop there.
    self._boundary = 1
    self._multiprocess: bool | None = False  # None: several processes, no preemption service

  def __enter__(self) -> PreemptionWatch:
    if threading.current_thread() is not threading.main_thread():
      log("warning: training outside the main thread: SIGTERM/SIGINT are not handled")
      return self
    self._multiprocess = _distributed()
    if self._multiprocess and _sync_manager() is None:  # jax_enable_preemption_service off
      log("warning: JAX's preemption service is off (jax_enable_preemption_service): the "
          "processes cannot agree on a step, so SIGTERM/SIGINT end the run without a save")
      self._multiprocess = None
      for sig in _SIGNALS:
        if signal.getsignal(sig) is _record_early:
          signal.signal(sig, _original(sig))
      if _take_early():
        signal.raise_signal(signal.SIGTERM)
      return self
    # Several processes: JAX's own SIGTERM handler must stay (it notifies every process; its
    # initialisation replaced the start-up's recorder at the OS level).
    for sig in (signal.SIGINT,) if self._multiprocess else _SIGNALS:
      previous = signal.signal(sig, self._handle)
      self._previous[sig] = _original(sig) if previous is _record_early else previous
    early = _take_early()  # after the handlers: a signal now is either recorded or handled
    if early:
      log("%s received while starting: the run stops before its first step", early)
      self.signal_name = early
      if self._multiprocess:  # every process agrees through JAX's preemption service
        signal.raise_signal(signal.SIGTERM)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.saving:
      log("%s: already saving the preemption checkpoint; it finishes first (a SIGKILL now "
          "keeps the previous checkpoint intact)", name)
      return
    if self.signal_name is None:
      self.signal_name = name
      log("%s received: saving a checkpoint at the next step boundary, then stopping", name)
    else:
      log("%s received again: the run already stops at the next step boundary (a SIGKILL "
          "before its save keeps the previous checkpoint intact)", name)
    if self._multiprocess:  # every process agrees through JAX's preemption service
      signal.raise_signal(signal.SIGTERM)

  def requested(self) -> bool:
    """Whether to stop at this step boundary (every process gets the same answer)."""
    if self._multiprocess is None:
      return False
    if not self._multiprocess:
      return self.signal_name is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    boundary, self._boundary = self._boundary, self._boundary + 1
    if multihost_utils.reached_preemption_sync_point(boundary):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    return False
