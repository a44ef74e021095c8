"""A run's directory: its lock, ``config.json``, ``results.json``, metrics and console log.

Every path goes through ``etils.epath``, so a workdir may be local or a
bucket (``gs://...``). Only process 0 writes these files.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import secrets
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from dsf3n_jax import cli
from dsf3n_jax.paths import atomic_savez, atomic_write, resolve  # noqa: F401 - this module's API
from dsf3n_jax.paths import is_local as _is_local

LOCK_NAME = "lock"
RUN_FILE = "config.json"  # what every training run's workdir holds
STATS_FILE = "feature_stats.npz"  # the train statistics of a run that standardises features
MODALITIES = ("visual", "audio")


class WorkdirError(PermissionError):
  """The workdir cannot be used: not writable, or another run holds it."""


def log(msg: str, *args) -> None:
  """Console progress (stderr), from process 0 only."""
  if jax.process_index() == 0:
    print(time.strftime("%H:%M:%S ") + (msg % args if args else msg), file=sys.stderr,
          flush=True)


def prepare(workdir) -> epath.Path:
  """Creates ``workdir`` and checks that it is writable (a one-line error naming it)."""
  workdir = resolve(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe_{socket.gethostname()}_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir}: not writable ({e})") from e
  return workdir


def check_writable(workdir) -> epath.Path:
  """``workdir`` (resolved) if it can be created and written, checked without creating it:
  the nearest of it and its parents that exists is a folder this process may write in, and
  none is a file. Else a ``WorkdirError`` naming it and why, e.g. ``--workdir=/a/b/run: not
  writable (/a/b is a file, not a folder)``. A bucket is checked when ``prepare`` makes it.
  (As root, ``os.access`` says writable whatever the permission bits: ``prepare``'s write
  probe stays the last word.)
  """
  workdir = resolve(workdir)
  if not _is_local(workdir):
    return workdir
  for folder in [workdir, *workdir.parents]:
    path = os.fspath(folder)
    if os.path.isdir(path):
      if not os.access(path, os.W_OK | os.X_OK):
        reason = f"no permission to write in {path}" if folder == workdir else \
            f"cannot create it: no permission to write in {path}"
        raise WorkdirError(f"--workdir={workdir}: not writable ({reason})")
      return workdir
    if os.path.lexists(path):  # a file, or a link to nothing, where a folder must be
      what = "a file" if os.path.exists(path) else "a broken link"
      raise WorkdirError(f"--workdir={workdir}: not writable ({path} is {what}, not a folder)")
  return workdir


def new_folders(path) -> list[epath.Path]:
  """``path`` and its parents that do not exist yet, innermost first: the folders that
  creating it creates. Empty for a bucket, which has no folders to leave behind."""
  path = resolve(path)
  if not _is_local(path):
    return []
  folders = []
  for folder in [path, *path.parents]:
    if folder.exists():
      break
    folders.append(folder)
  return folders


def remove_empty(folders) -> None:
  """Removes each of ``folders`` (innermost first, as ``new_folders`` lists them) that is an
  empty folder; one that holds anything is kept, and so are the folders above it."""
  for folder in folders:
    try:
      os.rmdir(os.fspath(folder))  # only an empty folder: atomic, never its contents
    except FileNotFoundError:
      continue
    except OSError:
      return


def _start_time(pid: int) -> str | None:
  """The kernel's start time of ``pid`` (Linux), to tell a reused pid from its first owner."""
  with contextlib.suppress(OSError, IndexError):
    with open(f"/proc/{pid}/stat") as f:  # the process table, not the workdir
      return f.read().rsplit(")", 1)[1].split()[19]
  return None


LEASE_S = 120.0  # a lock not renewed for this long belongs to a run that is gone
RENEW_S = 20.0  # how often a live run renews it


def _alive(owner: Mapping[str, Any], *, lease_s: float = LEASE_S) -> bool:
  """Whether the lock's owner still runs.

  On this host: its pid runs and is the same process (start time). On another
  host: it renewed its lease (``renewed``, seconds since the epoch) within
  ``lease_s``; a lock from before leases existed is assumed alive there.
  """
  if owner.get("host") != socket.gethostname():
    renewed = owner.get("renewed")
    return renewed is None or time.time() - float(renewed) < lease_s
  pid = int(owner.get("pid", -1))
  if pid <= 0:  # a lock file a killed run left half-written
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  started = owner.get("start_time")
  return started is None or started == _start_time(pid)


_UNREADABLE = {"pid": -1}  # a lock file that could not be read (half-written, or a failed read)


def _unreadable(owner: Mapping[str, Any]) -> bool:
  return owner.get("pid") == _UNREADABLE["pid"]


class WorkdirLock:
  """``workdir/lock``: a run holds its workdir for its whole life (process 0 only).

  The lock is a lease: the holder rewrites its ``renewed`` time every
  ``RENEW_S`` seconds from a daemon thread, and releases it on every exit path
  (an error, the end, SIGTERM/SIGINT through the training loop's preemption
  handling). A lock whose owner is gone is stale and taken over, saying so: on
  this host, its pid no longer runs (or runs but started later, a reused pid);
  from any host, its lease was not renewed for ``LEASE_S`` seconds (a run
  killed with SIGKILL, or a host that died), so a requeued job resumes on
  whatever host it lands. A lock of another host whose lease has not lapsed yet
  is watched until it does (a job requeued at once after its node died), and
  refused as soon as its owner renews it. A live one is refused with its pid and
  host.

  In a bucket, where a write cannot be made conditional here, a new lock is read
  back after ``settle_s`` seconds: of two runs that found no lock at once, the one
  whose write was last keeps it.

  A holder whose lease lapsed (its process frozen longer than ``LEASE_S``: a
  SIGSTOP, a hung file system) may find another run's lock when it renews: that
  run took the workdir over. It stops renewing, says so, and records that run's
  lock (``lost``, ``lost_to``); ``release`` leaves that lock as it is. The
  holder must then write nothing more into the workdir: the training loop asks
  ``lost_to`` before each write of a step boundary (records, checkpoints,
  ``results.json``) and stops the run with a ``WorkdirError`` naming that run
  (``taken_over``); a sweep asks ``raise_if_lost`` before each of its writes.
  ``lost_to`` reads the lock itself when no renewal succeeded for a while (a
  process just thawed may not have run its renewer yet).
  """

  def __init__(self, workdir, *, lease_s: float = LEASE_S, renew_s: float = RENEW_S,
               name: str = LOCK_NAME, flag: str = "--workdir", settle_s: float = 2.0):
    self.path = epath.Path(workdir) / name
    self.flag = flag
    self.held = False
    self.lease_s, self.renew_s, self.settle_s = lease_s, renew_s, settle_s
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None
    self._me: dict[str, Any] = {}
    self._renewed_at = 0.0  # the time of the last renewal written (or of the lock's creation)
    # The lock of the run that took this workdir over, once seen (``lost_to``).
    self.lost: dict[str, Any] | None = None

  def acquire(self) -> None:
    self._me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(
        os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "renewed": time.time()}
    for _ in range(2):
      owner = self._owner()
      if owner is not None:
        if _alive(owner, lease_s=self.lease_s) and not self._lapses(owner):
          raise WorkdirError(
              f"{self.flag}={self.path.parent} is in use by pid {owner.get('pid')} on host "
              f"{owner.get('host')} (started {owner.get('started')}); wait for that run to "
              f"end, pick another {self.flag}, or delete {self.path} if that run is gone")
        log("taking over the stale lock %s of pid %s on %s (that run is gone)", self.path,
            owner.get("pid"), owner.get("host"))
        self._remove_stale(owner)
      # Renewed now, not when this call began: waiting for a lease to lapse takes up to
      # ``lease_s``, and a lock written with that old time would look lapsed to other hosts.
      self._me["renewed"] = time.time()
      if self._create(json.dumps(self._me)):
        self.held, self.lost, self._renewed_at = True, None, self._me["renewed"]
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="lock lease")
        self._renewer.start()
        return
    raise WorkdirError(f"{self.flag}={self.path.parent}: could not take {self.path}: another "
                       "run took it at the same time")

  def _remove_stale(self, owner: Mapping[str, Any]) -> None:
    """Removes the lock judged stale, and only it: of two runs taking over one stale lock at
    once, the second must not remove the lock the first has just created. Locally the lock
    is renamed aside (atomic: one rename wins) and put back, unless it is still ``owner``'s;
    in a bucket it is read again just before it is deleted."""
    if not _is_local(self.path):
      now = self._owner()
      if now is not None and (now == owner or _unreadable(now)):
        self.path.unlink(missing_ok=True)
      return
    aside = self.path.parent / f".{self.path.name}.stale.{os.getpid()}.{secrets.token_hex(4)}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # removed by another run taking it over; O_EXCL decides who creates it
    try:
      taken = json.loads(aside.read_text())
    except (ValueError, OSError):
      taken = _UNREADABLE
    if taken == owner or _unreadable(taken):
      aside.unlink(missing_ok=True)
      return
    with contextlib.suppress(OSError):  # another run's new lock: back, unless a third exists
      os.link(aside, self.path)
    aside.unlink(missing_ok=True)

  def _lapses(self, owner: Mapping[str, Any]) -> bool:
    """For a lease of another host: waits while it is neither renewed nor lapsed. True when
    it lapsed (or was released), False as soon as its owner renews it (a live run)."""
    renewed = owner.get("renewed")
    if owner.get("host") == socket.gethostname() or renewed is None:
      return False
    lapse = float(renewed) + self.lease_s
    log("%s: held by pid %s on host %s, renewed %.0f s ago; waiting up to %.0f s for its "
        "lease to lapse (a live run renews it every %.0f s)", self.path, owner.get("pid"),
        owner.get("host"), time.time() - float(renewed), lapse - time.time(), RENEW_S)
    while (left := lapse - time.time()) > 0:
      time.sleep(min(left, min(self.renew_s, 5.0)))
      now = self._owner()
      if now is not None and _unreadable(now):
        continue  # a read that failed, or a lock being written: read again
      if now != owner:
        return now is None
    return True

  def _renew(self) -> None:
    while not self._stop.wait(self.renew_s) and self._renew_once():
      pass

  def _renew_once(self) -> bool:
    """Renews the lease; False (renewing stops) once another run has taken the lock."""
    if self.lost is not None or self._taken(self._owner()):
      return False  # never written over: that run holds the workdir now
    renewed = time.time()
    with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
      atomic_write(self.path, json.dumps({**self._me, "renewed": renewed}))
      self._renewed_at = renewed
    return True

  def _taken(self, owner: Mapping[str, Any] | None) -> bool:
    """Whether ``owner`` (the lock as read) is another run's; the first time, it is recorded
    (``lost``) and said."""
    if owner is None or _unreadable(owner) or self._mine(owner):
      return False
    if self.lost is None:
      self.lost = dict(owner)
      log("error: %s now names pid %s on host %s: another run took this workdir over (this "
          "run's lease lapsed); this run no longer holds it", self.path, owner.get("pid"),
          owner.get("host"))
    return True

  def lost_to(self) -> dict[str, Any] | None:
    """The lock (pid, host, started) of the run that took this workdir over, else None.

    What the renewer saw, at no cost while it renews in time. When no renewal succeeded for
    ``min(2 * renew_s, lease_s / 2)`` seconds (this process was frozen, or its writes fail)
    the lease may have lapsed and the renewer not have run since: the lock is read here.
    """
    if self.held and self.lost is None and \
        time.time() - self._renewed_at > min(2 * self.renew_s, self.lease_s / 2):
      self._taken(self._owner())
    return self.lost

  def raise_if_lost(self, stopped: str) -> None:
    """For a holder about to write into the workdir: a ``WorkdirError`` (``taken_over``) when
    another run took it over (``lost_to``). ``stopped`` says where the holder stopped."""
    owner = self.lost_to()
    if owner is not None:
      raise taken_over(self.flag, self.path, owner, lease_s=self.lease_s, stopped=stopped)

  def _mine(self, owner: Mapping[str, Any]) -> bool:
    return all(owner.get(k) == self._me[k] for k in ("pid", "host", "started"))

  def _owner(self) -> dict[str, Any] | None:
    try:
      owner = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # half-written by a run killed while taking it
      owner = None
    # Not a lock's record (JSON of another shape): as unreadable, never another run's.
    return owner if isinstance(owner, dict) else {**_UNREADABLE, "host": socket.gethostname()}

  def _create(self, text: str) -> bool:
    if _is_local(self.path):  # O_EXCL: of two runs starting at once, exactly one wins
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    self.path.write_text(text)  # object stores: the last writer wins; read back to check
    time.sleep(self.settle_s)  # after a write of another run that also found no lock
    return self.path.read_text() == text

  def release(self) -> None:
    if self.held:
      self._stop.set()
      if self._renewer is not None:
        self._renewer.join(timeout=5.0)
      owner = self._owner()
      # Not another run's: neither one seen (``lost``, whatever the lock reads now) nor this.
      if self.lost is None and (owner is None or _unreadable(owner) or self._mine(owner)):
        with contextlib.suppress(OSError):
          self.path.unlink(missing_ok=True)
      self.held = False


def taken_over(flag: str, lock_path, owner: Mapping[str, Any] | None, *, lease_s: float,
               stopped: str) -> WorkdirError:
  """The error of a run whose workdir another run took over (``WorkdirLock.lost_to``): who
  holds ``lock_path`` now (``owner``; None where another process saw it), and where this
  run ``stopped``."""
  who = (f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started')})"
         if owner is not None else "another run (process 0 saw it)")
  return WorkdirError(
      f"{flag}={epath.Path(lock_path).parent}: another run took it over while this run's lock "
      f"lease had lapsed (this process stopped, or cut off from the workdir, for over "
      f"{lease_s:.0f} s): {who} holds {lock_path} now; this run stopped {stopped}, and left "
      "that run's lock as it is")


def write_run_config(workdir, config: ml_collections.ConfigDict, mcfg: Mapping[str, Any],
                     fingerprint: Mapping[str, Any], *, model_given: bool = False,
                     no_data: bool = False) -> None:
  """``config.json``: the resolved config, model and data, read by ``restore_model``.

  ``loss_terms`` records where each loss term is registered (``"module:name"``),
  so that reading the run back imports a user's module. ``model_given``: the run trained a
  model given from Python, not the one ``config.model`` describes (``restore_model`` then
  refuses to rebuild it). ``no_data``: weights from elsewhere (``convert``), trained on no
  dataset of ``config.data`` (the tools then need the data named: ``has_data``).
  """
  from dsf3n_jax import losses  # pylint: disable=g-import-not-at-top
  atomic_write(epath.Path(workdir) / RUN_FILE, json.dumps(
      {"config": config.to_dict(), "model": mcfg, "data": dict(fingerprint),
       "loss_terms": losses.term_origins(config.loss.terms),
       **({"model_given": True} if model_given else {}),
       **({"no_data": True} if no_data else {})}, indent=2, default=str))


def has_data(workdir) -> bool:
  """Whether the run in ``workdir`` trained on the dataset its config names (a converted
  run's weights did not: ``write_run_config(no_data=True)``)."""
  return not read_run_config(workdir).get("no_data")


def write_feature_stats(workdir, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
  """``feature_stats.npz``: the train split's ``(mean, std)`` per modality that a run
  standardised its features with (``data.normalize="standardize"``), so that its model embeds
  new features (``index``, ``search``, ``retrieve --data``) without its dataset."""
  atomic_savez(epath.Path(workdir) / STATS_FILE,
               {f"{m}_{what}": np.asarray(stats[m][i], np.float32)
                for m in MODALITIES for i, what in enumerate(("mean", "std"))})


def read_feature_stats(workdir) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
  """``write_feature_stats``' statistics; None when the run wrote none (a run that does not
  standardise, or one older than the file)."""
  path = resolve(workdir) / STATS_FILE
  if not path.exists():
    return None
  keys = [f"{m}_{what}" for m in MODALITIES for what in ("mean", "std")]
  try:
    with path.open("rb") as f, np.load(f) as z:
      arrays = {k: np.asarray(z[k], np.float32) for k in keys}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not the run's feature statistics (expected the arrays "
                     f"{', '.join(keys)}: {type(e).__name__}: {e})") from e
  return {m: (arrays[f"{m}_mean"], arrays[f"{m}_std"]) for m in MODALITIES}


def check_run_dir(workdir, *, flag: str = "--workdir") -> epath.Path:
  """``workdir`` if it holds a training run (its ``config.json``); else a ``cli.UsageError``.

  The one-line message names the flag and what is missing, e.g.
  ``--workdir=/tmp/x: no training run here (config.json not found)``.
  """
  path, where = resolve(workdir), f"{flag}={workdir}: no training run here"
  if not path.is_dir():
    raise cli.UsageError(f"{where} ({'not a directory' if path.exists() else 'no such directory'})")
  if not (path / RUN_FILE).is_file():
    raise cli.UsageError(f"{where} ({RUN_FILE} not found)")
  return path


def read_run_config(workdir) -> dict[str, Any]:
  """``config.json`` of a run (``check_run_dir`` says what is missing)."""
  path = check_run_dir(workdir) / RUN_FILE
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


RESULTS_FILE = "results.json"  # a finished run's final and best metrics


def write_results(workdir, results: Mapping[str, Any]) -> None:
  atomic_write(epath.Path(workdir) / RESULTS_FILE, json.dumps(results, indent=2))


def read_results(workdir) -> dict[str, Any] | None:
  """``results.json`` of the run in ``workdir``; None when there is none, or it is not a JSON
  object (a file that is not the run's results is not trusted as its record)."""
  path = epath.Path(workdir) / RESULTS_FILE
  try:
    results = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return results if isinstance(results, dict) else None


def _record_key(record: Mapping[str, Any]) -> tuple[int, str, Any]:
  """What tells a ``metrics.jsonl`` record from another of its step: its split (an evaluator's
  name, or ``train``) and ``final`` (``MetricWriter.write``)."""
  final = record.get("final")
  return record.get("step", 0), record.get("split"), final if isinstance(final, str) else None


class _EpathEventFile:
  """A TensorBoard event file written through ``epath`` (whole, at each flush)."""

  def __init__(self, path: str):
    self.path, self.buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory for a URL scheme, through ``epath`` (``gs://``: gcsfs or
  TensorFlow's gfile, as for every other file of the run)."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _import_tensorboardx():
  """tensorboardX, imported without PyTorch.

  tensorboardX imports torch when it is installed (1.5-3 s at every start), only to accept
  torch tensors; this writer gives it floats. Unless something imported torch already, the
  import runs with ``import torch`` failing, as if torch were not installed; torch stays
  importable afterwards.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    return importlib.import_module("tensorboardX")
  sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    return importlib.import_module("tensorboardX")  # no TensorFlow import either
  finally:
    del sys.modules["torch"]


def _register_tensorboard_scheme(scheme: str) -> None:
  _import_tensorboardx().record_writer.register_writer_factory(scheme, _EpathEventFiles())


class MetricWriter:
  """``metrics.jsonl`` and TensorBoard; only process 0 writes files.

  On resume, ``metrics.jsonl`` is cut back to the restored step so that it
  never holds records of steps that are replayed, and TensorBoard purges their
  events (``purge_step``). A record of the restored step that a resumed run makes again
  (an evaluation of the restored state: the repair of a missing best, or a final evaluation
  whose record in the checkpoint a kill prevented) replaces the one the file holds, in
  place, in one atomic rewrite of the file: one record per step, split and kind (``final``:
  a final evaluation's mark, ``write``), never a second. Records this process wrote are
  never replaced.
  """

  def __init__(self, workdir, *, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb = None
    self.lines: list[str] = []
    # (step, split, final) of each line read back on resume (what a write of the same
    # replaces); None for a line this process wrote.
    self.keys: list[tuple[int, str, Any] | None] = []
    if not self.active:
      return
    if self.path.exists():
      if resume_step is not None:
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
            step = record.get("step", 0)
            if not isinstance(step, int) or isinstance(step, bool):
              raise ValueError(f"its step is {step!r}, not an int")
          except (ValueError, AttributeError) as e:
            raise ValueError(f"{self.path}: line {number} is not a JSON record of a step ({e}); "
                             "repair or delete that line to resume") from e
          if step <= resume_step:
            self.lines.append(line + "\n")
            self.keys.append(_record_key(record))
      atomic_write(self.path, "".join(self.lines))
    tensorboard = epath.Path(workdir) / "tensorboard"
    if not _is_local(tensorboard):
      _register_tensorboard_scheme(os.fspath(tensorboard).split("://", 1)[0])
    # TensorBoard hides the events of the replayed steps as the file above drops them (a
    # fresh start: every step, as an attempt that died before its first checkpoint wrote some).
    # A file of its own: tensorboardX names it by the second and the host only, so a writer
    # opened within the same second as the last one would overwrite that one's events.
    self.tb = _import_tensorboardx().SummaryWriter(
        os.fspath(tensorboard), purge_step=(resume_step or 0) + 1,
        filename_suffix=f".{time.time_ns()}")

  def adopt_final(self, step: int, split: str, final: str, *, after: int) -> None:
    """Takes the unmarked records of ``step`` and ``split`` read back, after the first
    ``after`` of them, as the final evaluation ``final``: those a version that did not mark
    its final evaluations left, which a ``write`` of that evaluation then replaces."""
    unmarked = [i for i, key in enumerate(self.keys) if key == (step, split, None)]
    for i in unmarked[after:]:
      self.keys[i] = (step, split, final)

  def write(self, step: int, split: str, values: Mapping[str, Any], *,
            final: str | None = None, **extra) -> None:
    """Writes one record (``step``, ``split``, ``extra``, ``values``) to both logs.

    ``final``: the record is a final evaluation's, made with the settings this string stands
    for (``"final"`` in the record): an early stop's final evaluation of a step is a record
    beside that step's periodic one, and a final evaluation made with other settings is
    another record. A record read back on resume with the same step, split and ``final`` is
    replaced by this one (its copies removed), where it stands.
    """
    if not self.active:
      return
    record = {"step": int(step), "split": split, **extra,
              **({} if final is None else {"final": final}),
              **{k: float(v) for k, v in values.items()}}
    line, key = json.dumps(record) + "\n", (int(step), split, final)
    same = [i for i, k in enumerate(self.keys) if k == key]
    if same:  # made again after a resume: in place of the record (and its copies) read back
      self.lines[same[0]], self.keys[same[0]] = line, None
      for i in reversed(same[1:]):
        del self.lines[i], self.keys[i]
    else:
      self.lines.append(line)
      self.keys.append(None)
    # The whole file, atomically: object stores cannot append (a few hundred lines a run).
    atomic_write(self.path, "".join(self.lines))
    for name, value in {**values, **extra}.items():
      if name != "epoch":
        self.tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      tb, self.tb = self.tb, None
      tb.close()


CLOSE_TIMEOUT_S = 60.0


def close_within(close, what: str) -> None:
  """Calls ``close`` in a daemon thread; a failure or a hang is logged, never waited out."""
  failure = []

  def target():
    try:
      close()
    except Exception as e:  # noqa: BLE001 - the failure that ended the run is what is raised
      failure.append(e)

  thread = threading.Thread(target=target, daemon=True, name=f"close {what}")
  thread.start()
  thread.join(CLOSE_TIMEOUT_S)
  if thread.is_alive():
    log("warning: closing %s did not finish in %.0f s; left behind", what, CLOSE_TIMEOUT_S)
  elif failure:
    log("warning: closing %s: %s", what, cli.first_line(failure[0]))


def format_results(results: Mapping[str, Any]) -> str:
  """The final mAP table, as printed at the end of a run: both protocols side by side."""
  directions = ("map_audio_to_visual", "map_visual_to_audio", "map_average")
  rows = [("split", "A->V", "V->A", "average", "A->V", "V->A", "average")]

  def row(label, values):
    cells = [f"{values[p + k]:.4f}" if p + k in values else "-"
             for p in ("", "unimodal_") for k in directions]
    rows.append((label, *cells))

  final = results["final"]  # validation, test, then other evaluators that report mAP
  for name in sorted(final, key=lambda n: {"validation": 0, "test": 1}.get(n, 2)):
    if any(k.startswith(("map_", "unimodal_map_")) for k in final[name]):
      row(f"final {name}", final[name])
  best = results.get("best")
  if best:
    metric = best.get("metric", "map_average")
    for split in ("validation", "test"):
      if split in best:
        how = ("the final state: selection_split='last'" if best["selected_on"] == "last"
               else f"{metric} on {best['selected_on']}")
        row(f"best {split} (epoch {best['epoch']}, {how})", best[split])
  width = max(len(r[0]) for r in rows)
  lines = [f"{'':<{width}}  {'paired (paper)':^23}   {'unimodal (deployable)':^23}"]
  lines += [f"{r[0]:<{width}}  " + " ".join(f"{c:>7}" for c in r[1:4]) + "   "
            + " ".join(f"{c:>7}" for c in r[4:]) for r in rows]
  return "\n".join(lines)
