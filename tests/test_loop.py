"""The step-driven loop: mid-epoch checkpoints and resumes, preemption, actions, the lock lease."""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
from flax import traverse_util

from dsf3n_jax import checkpoints, config_check, train
from dsf3n_jax.training import actions as actions_lib
from dsf3n_jax.training import preemption
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import workdir as workdir_lib
from tests.test_train import REPO, _rewrite_final_meta, mesh_of, tiny_config


class _SignalAt(actions_lib.PeriodicAction):
  """Sends ``sig`` to this process after step ``at`` (a user's action, as the loop runs it)."""

  def __init__(self, at: int, sig=signal.SIGTERM):
    super().__init__(every_steps=at)
    self.at, self.sig, self.sent = at, sig, 0

  def __call__(self, loop, step):
    if step == self.at and not self.sent:
      self.sent += 1
      os.kill(os.getpid(), self.sig)


def _params(workdir):
  _, variables, _ = train.restore_model(str(workdir))
  return traverse_util.flatten_dict(variables, sep="/")


# The tests that start from a finished ``tiny_config(num_epochs=1)`` run take a copy of it
# (tests/conftest.py's ``plain_run``). They run on one xdist worker (``--dist loadgroup``,
# pyproject.toml), this file's and test_failures.py's: spread over two, each would train it.
SHARES_PLAIN_RUN = pytest.mark.xdist_group("plain_run")


@pytest.mark.parametrize("devices,on_device", [(1, "false"), (8, "true")])
def test_a_run_preempted_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch,
                                                                        devices, on_device):
  """SIGTERM after step 4 of 6 per epoch: a checkpoint of step 4 (mid-epoch), ``Preempted``,
  the lock released; the rerun continues with the same batches and ends bit for bit equal:
  parameters, BatchNorm statistics, ``results.json``'s final and best metrics and the epoch's
  train record."""
  monkeypatch.setattr(run_lib, "make_mesh", lambda: mesh_of(devices))
  config = tiny_config(**{"num_epochs": 2, "checkpoint_every_steps": 3,
                          "data.on_device": on_device, "data.validation_fraction": 0.25})
  spe = (96 - 24) // 16  # 4 steps per epoch once validation is carved
  assert spe == 4
  full = train.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "full"))

  workdir = tmp_path / "preempted"
  with pytest.raises(preemption.Preempted, match=r"SIGTERM: saved .*checkpoints/2 at step 2 "
                     r"\(epoch 1, step 2/4\) of 8 steps") as stopped:
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir),
                             actions=[_SignalAt(2)])
  assert stopped.value.step == 2 and stopped.value.exit_status == 75
  # The streamed loader's prefetch thread is stopped on this exit path too.
  assert not [t.name for t in threading.enumerate() if t.name.startswith("prefetch")]
  assert checkpoints.Checkpointer(workdir, read_only=True).steps() == [2]
  assert not (workdir / "lock").exists() and not (workdir / "results.json").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back

  resumed = train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
  for key in ("final", "best", "epochs", "steps"):
    assert resumed[key] == full[key], key
  a, b = _params(tmp_path / "full"), _params(workdir)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  def train_records(run):
    return [{k: v for k, v in json.loads(line).items()
             if k not in ("samples_per_second", "seconds_per_step")}
            for line in open(tmp_path / run / "metrics.jsonl")
            if json.loads(line)["split"] == "train"]

  assert train_records("preempted") == train_records("full")  # epoch 1's sums were saved
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert all(r["seconds_per_step"] > 0 for r in records if r["split"] == "train")


def _tensorboard_events(folder):
  """Every event of the TFRecord files under ``folder`` (length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 16 + length
  return events


def test_a_resume_hides_the_replayed_steps_in_both_metric_logs(tmp_path):
  writer = workdir_lib.MetricWriter(tmp_path, resume_step=None)
  for step in (1, 2, 3):
    writer.write(step, "train", {"loss": float(step)})
  writer.close()
  resumed = workdir_lib.MetricWriter(tmp_path, resume_step=2)  # step 3 is trained again
  resumed.write(3, "train", {"loss": 0.5})
  resumed.close()
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3]
  # TensorBoard drops the events at and after a START at step 3 from the files before it; a
  # fresh start (an attempt that died before its first checkpoint had written some) at step 1.
  def starts():
    return [e.step for e in _tensorboard_events(tmp_path / "tensorboard")
            if e.HasField("session_log") and e.session_log.status == e.session_log.START]

  assert starts() == [1, 3]
  workdir_lib.MetricWriter(tmp_path, resume_step=None).close()
  assert starts() == [1, 3, 1] and (tmp_path / "metrics.jsonl").read_text() == ""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "spl\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
    workdir_lib.MetricWriter(tmp_path, resume_step=1)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": "3"}\n')
  with pytest.raises(ValueError, match=r"line 2 is not a JSON record of a step \(its step is "
                     r"'3', not an int\)"):
    workdir_lib.MetricWriter(tmp_path, resume_step=1)


def test_a_signal_while_starting_stops_the_run_before_its_first_step(tmp_path, monkeypatch):
  """From ``main``'s first line (``watch_from_start``), through reading the data and restoring
  the checkpoint: exit status 75 at once, nothing saved, the rerun resumes as before."""
  config = tiny_config(num_epochs=1)
  workdir = tmp_path / "run"
  preemption.watch_from_start()
  os.kill(os.getpid(), signal.SIGTERM)  # while jax is imported, say
  with pytest.raises(preemption.Preempted, match="SIGTERM while starting, before the first "
                     "step: nothing new to save; rerun the same command to resume from the "
                     "start") as stopped:
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
  assert stopped.value.exit_status == 75 and stopped.value.step == 0
  assert not checkpoints.Checkpointer(workdir, read_only=True).steps()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the recorder is gone too
  preemption.watch_from_start()
  os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, recorded the same way
  with pytest.raises(preemption.Preempted, match="SIGINT while starting"):
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
  first = train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))

  real = run_lib.prepare_run

  def prepare_run(*args, **kwargs):  # SIGINT while the data is read
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

  monkeypatch.setattr(run_lib, "prepare_run", prepare_run)
  more = tiny_config(num_epochs=2)
  with pytest.raises(preemption.Preempted, match=r"SIGINT while starting, .* resume from "
                     r"epoch 1$"):
    train.train_and_evaluate(more.copy_and_resolve_references(), str(workdir))
  assert checkpoints.Checkpointer(workdir, read_only=True).steps() == [first["steps"]]
  monkeypatch.setattr(run_lib, "prepare_run", real)
  assert train.train_and_evaluate(more.copy_and_resolve_references(), str(workdir))["steps"] \
      == 2 * first["steps"]


@SHARES_PLAIN_RUN
def test_a_signal_at_the_last_step_lets_the_run_finish(tmp_path, plain_run):
  """Only the final evaluations are left: the run ends normally, as an uninterrupted one
  (stopping there would write them twice, once now and once more on the rerun)."""
  config = tiny_config(num_epochs=1)
  plain = plain_run(tmp_path / "plain")  # the same config, uninterrupted
  results = train.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "run"),
                                     actions=[_SignalAt(6)])
  assert results["steps"] == plain["steps"] == 6
  assert results["final"] == plain["final"] and (tmp_path / "run" / "results.json").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_while_starting_a_second_signal_stops_at_once_and_handlers_are_put_back():
  """Ctrl-C twice stops a start that hangs (a coordinator that never answers); the handlers
  found before the start-up's recorder are the ones put back."""
  def custom(signum, frame):
    del signum, frame

  before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(
      signal.SIGTERM, custom)
  try:
    preemption.watch_from_start()
    os.kill(os.getpid(), signal.SIGINT)  # recorded: the run would stop before its first step
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # the second: Ctrl-C's own handler, now
      time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with preemption.PreemptionWatch() as watch:
      assert watch.requested() and watch.signal_name == "SIGINT"  # the first one still counts
    assert signal.getsignal(signal.SIGTERM) is custom  # not a default in its place
  finally:
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])


def test_an_empty_workdir_is_refused_not_read_as_the_current_directory(tmp_path):
  with pytest.raises(ValueError, match=r"workdir: an empty path \(''; an unset variable\?\)"):
    train.train_and_evaluate(tiny_config(), "")
  proc = subprocess.run([sys.executable, "-m", "dsf3n_jax.main",
                         f"--config={REPO / 'configs' / 'synthetic.py'}", "--workdir="],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 2, proc.stderr
  assert "--workdir: an empty path (''; an unset variable?): expected a directory" in proc.stderr
  assert not list(tmp_path.iterdir())  # nothing written where it ran


def test_a_second_signal_while_saving_changes_nothing(monkeypatch):
  logged = []
  monkeypatch.setattr(preemption, "log", lambda msg, *a: logged.append(msg % a))
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a shell's background job
  with preemption.PreemptionWatch() as watch:
    assert not watch.requested()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the same path as SIGTERM
    assert watch.requested() and watch.signal_name == "SIGINT"
    os.kill(os.getpid(), signal.SIGTERM)
    assert "SIGTERM received again: the run already stops" in logged[-1]
    watch.saving = True
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.signal_name == "SIGINT"
  assert "SIGTERM: already saving the preemption checkpoint" in logged[-1]
  assert signal.getsignal(signal.SIGINT) is before  # the handler it found, put back


def test_the_lock_is_a_lease_other_hosts_can_see_expire(tmp_path, monkeypatch):
  path = tmp_path / "lock"
  owner = {"pid": 4242, "host": "other-host", "started": "then"}
  logged = []
  monkeypatch.setattr(workdir_lib, "log", lambda msg, *a: logged.append(msg % a))
  # A live run on another host renews its lease: refused once a renewal is seen.
  stop = threading.Event()

  def renews():
    while not stop.wait(0.1):
      workdir_lib.atomic_write(path, json.dumps({**owner, "renewed": time.time()}))

  path.write_text(json.dumps({**owner, "renewed": time.time()}))
  renewer = threading.Thread(target=renews)
  renewer.start()
  try:
    with pytest.raises(workdir_lib.WorkdirError, match="in use by pid 4242 on host other-host"):
      workdir_lib.WorkdirLock(tmp_path, lease_s=30, renew_s=0.05).acquire()
  finally:
    stop.set()
    renewer.join()
  assert "waiting up to" in logged[-1] and json.loads(path.read_text())["pid"] == 4242
  # A job requeued at once after its node died: the lease is not renewed, so the new run
  # waits for it to lapse and takes it over.
  path.write_text(json.dumps({**owner, "renewed": time.time()}))
  start = time.time()
  lock = workdir_lib.WorkdirLock(tmp_path, lease_s=1.0, renew_s=3600)  # no renewal seen here
  lock.acquire()
  assert 0.8 < time.time() - start < 10 and json.loads(path.read_text())["pid"] == os.getpid()
  assert "taking over the stale lock" in logged[-1]
  # Written as renewed when it was taken, not when the wait began (a lease lapsed already).
  assert json.loads(path.read_text())["renewed"] > start + 0.8
  lock.release()
  path.write_text(json.dumps({**owner, "renewed": time.time() - workdir_lib.LEASE_S - 1}))
  lock = workdir_lib.WorkdirLock(tmp_path, renew_s=0.05)  # a requeued job on another host
  lock.acquire()
  first = json.loads(path.read_text())
  assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
  deadline = time.time() + 10
  while json.loads(path.read_text())["renewed"] == first["renewed"] and time.time() < deadline:
    time.sleep(0.05)
  assert json.loads(path.read_text())["renewed"] > first["renewed"]  # the holder renews it
  lock.release()
  assert not path.exists()


def _take_over(lock, record) -> None:
  """Another run takes ``lock``'s workdir over (as after the holder's lease lapsed): its lock
  replaces the holder's. Returns once the holder's renewer saw it and stopped; written again
  while it runs, since a renewal that read the holder's lock just before writes it back."""
  deadline = time.monotonic() + 120
  while lock._renewer.is_alive():
    assert time.monotonic() < deadline, "the renewer never saw the other run's lock"
    workdir_lib.atomic_write(lock.path, json.dumps(record))
    lock._renewer.join(0.5)


def renewing_fast(locks: list) -> type:
  """A ``WorkdirLock`` that renews every 50 ms, so that a takeover is seen at once; each one
  made is appended to ``locks`` (for ``_take_over``)."""

  class Lock(workdir_lib.WorkdirLock):
    def __init__(self, workdir, **kwargs):
      super().__init__(workdir, **{**kwargs, "renew_s": 0.05})
      locks.append(self)

  return Lock


_OTHER_RUN = {"pid": 4242, "host": "other-host", "start_time": None,
              "started": "2030-01-02 03:04:05"}


def test_a_lock_another_run_took_is_recorded_and_left_to_it(tmp_path, monkeypatch):
  path, logged = tmp_path / "lock", []
  monkeypatch.setattr(workdir_lib, "log", lambda msg, *a: logged.append(msg % a))
  other = {**_OTHER_RUN, "renewed": time.time()}
  # The renewer that finds another run's lock records it and stops renewing.
  lock = workdir_lib.WorkdirLock(tmp_path, renew_s=0.05)
  lock.acquire()
  assert lock.lost_to() is None
  _take_over(lock, other)
  assert lock.lost_to() == other and "another run took this workdir over" in logged[-1]
  lock.release()
  assert json.loads(path.read_text()) == other  # that run's, left as it is
  # A process frozen past its lease, its renewer not run since: ``lost_to`` reads the lock.
  path.unlink()
  lock = workdir_lib.WorkdirLock(tmp_path, lease_s=0.2, renew_s=3600)
  lock.acquire()
  path.write_text(json.dumps(other))
  assert lock.lost is None
  time.sleep(0.2)  # the renewals are overdue after this (a lower bound only)
  assert lock.lost_to() == other
  lock.release()
  assert json.loads(path.read_text()) == other


class _TakeOver(actions_lib.PeriodicAction):
  """Another run takes the workdir over after step ``at`` (``_take_over``); what the workdir
  held then is kept in ``seen``."""

  def __init__(self, at: int, locks, record):
    super().__init__(every_steps=at)
    self.locks, self.record, self.seen = locks, record, None

  def __call__(self, loop, step):
    if self.seen is None:
      loop.checkpointer.wait()  # the saves before the takeover, complete
      _take_over(self.locks[0], self.record)
      self.seen = {"metrics": (loop.run.workdir / "metrics.jsonl").read_text(),
                   "checkpoints": loop.checkpointer.steps()}


@pytest.mark.parametrize("at", [7, 8])
def test_a_run_whose_workdir_another_run_took_over_stops_and_writes_nothing_more(
    tmp_path, monkeypatch, at):
  """A takeover after step 7 is seen at the next boundary (step 8), one after step 8 before
  the checkpoint of step 8: a ``WorkdirError`` naming that run, no record, checkpoint or
  ``results.json`` written after it, and that run's lock left in the workdir."""
  locks = []
  monkeypatch.setattr(workdir_lib, "WorkdirLock", renewing_fast(locks))
  other = {**_OTHER_RUN, "renewed": time.time()}
  config = tiny_config(num_epochs=2, checkpoint_every_steps=4)  # 6 steps/epoch: 4, 6, 8, 12
  workdir = tmp_path / "run"
  take_over = _TakeOver(at, locks, other)
  with pytest.raises(workdir_lib.WorkdirError) as stopped:
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir),
                             actions=[take_over])
  message = str(stopped.value)
  assert f"--workdir={workdir}: another run took it over" in message
  assert (f"pid 4242 on host other-host (started 2030-01-02 03:04:05) holds {workdir}/lock now; "
          "this run stopped at step 8 (epoch 2, step 2/6), wrote nothing more and saved no "
          "checkpoint after it found the lock lost") in message
  assert stopped.value.__notes__ == [f"last intact checkpoint: {workdir}/checkpoints/6"]
  assert take_over.seen["checkpoints"] == [4, 6]
  assert checkpoints.Checkpointer(workdir, read_only=True).steps() == [4, 6]
  assert (workdir / "metrics.jsonl").read_text() == take_over.seen["metrics"]
  assert max(json.loads(line)["step"] for line in take_over.seen["metrics"].splitlines()) == 6
  assert not (workdir / "results.json").exists()
  assert json.loads((workdir / "lock").read_text()) == other


def test_a_profile_past_the_last_step_ends_at_the_last_step(tmp_path, monkeypatch):
  calls, logged = [], []
  monkeypatch.setattr(actions_lib.jax.profiler, "start_trace", lambda d: calls.append("start"))
  monkeypatch.setattr(actions_lib.jax.profiler, "stop_trace", lambda: calls.append("stop"))
  monkeypatch.setattr(actions_lib, "log", lambda msg, *a: logged.append(msg % a))
  loop = types.SimpleNamespace(state=None, total=14)
  profile = actions_lib.Profile(10, 15, tmp_path)
  assert not profile.due(14, 14)  # not tracing yet
  profile(loop, 10)
  assert profile.due(14, 14) and not profile.due(13, 14)
  profile(loop, 14)
  assert calls == ["start", "stop"] and not profile.tracing
  assert logged[0].startswith("profiling steps 11-14 into")
  assert logged[1].startswith(f"profile of steps 11-14 written to {tmp_path}")


def test_profile_steps_past_the_last_step_are_refused_before_anything_is_written(
    tmp_path, monkeypatch):
  """A trace of steps the run does not take (1 epoch of 6 steps here) is a config error naming
  the key, its value and the last step, before the first compile and before the workdir is
  made; a trace ending at the last step is accepted."""
  from dsf3n_jax.training import loop as loop_lib

  def compiles(*args, **kwargs):  # the state's initialiser: a run's first compile
    raise AssertionError("the run began compiling")

  monkeypatch.setattr(loop_lib, "make_init_fn", compiles)
  workdir = tmp_path / "run"
  for steps, beyond in (((4, 7), ""), ((10, 20), " (no step of the run would be traced)")):
    with pytest.raises(config_check.ConfigError, match=re.escape(
        f"config.profile_steps={steps}: expected (start, stop) with stop <= 6, the run's last "
        f"step (1 epoch of 6 steps); found stop {steps[1]}{beyond}")):
      train.train_and_evaluate(tiny_config(num_epochs=1, profile_steps=steps), str(workdir))
    assert not workdir.exists()
  run_lib.check_steps(tiny_config(num_epochs=1, profile_steps=(5, 6)), 6)
  run_lib.check_steps(tiny_config(num_epochs=2, profile_steps=[0, 12]), 6)
  run_lib.check_steps(tiny_config(num_epochs=1), 6)  # no profile


def test_a_run_resumed_past_the_profiles_start_says_it_traces_nothing(tmp_path, monkeypatch):
  calls, logged = [], []
  monkeypatch.setattr(actions_lib.jax.profiler, "start_trace", lambda d: calls.append("start"))
  monkeypatch.setattr(actions_lib, "log", lambda msg, *a: logged.append(msg % a))
  loop = types.SimpleNamespace(state=None, total=12)
  actions_lib.Profile(2, 5, tmp_path).begin(loop, 0)  # a fresh run: traced when it gets there
  actions_lib.Profile(2, 5, tmp_path).begin(loop, 12)  # finished: nothing left to trace
  assert calls == [] and logged == []
  actions_lib.Profile(2, 5, tmp_path).begin(loop, 3)
  assert calls == [] and logged == [
      "config.profile_steps=(2, 5): not traced, the run resumes at step 3, after the profile's "
      "start (a trace is taken only by a run that reaches step 2 from before it: a new "
      "--workdir, or a later (start, stop))"]
  actions_lib.Profile(3, 5, tmp_path).begin(loop, 3)  # resumed at its start: traced
  assert calls == ["start"]


@SHARES_PLAIN_RUN
def test_a_resume_with_another_batch_size_is_refused_and_other_schedule_changes_are_said(
    tmp_path, plain_run, monkeypatch):
  from dsf3n_jax.training import loop as loop_lib
  from dsf3n_jax.training.run import ResumeMismatchError
  workdir = str(tmp_path / "run")
  plain_run(workdir)  # tiny_config(num_epochs=1), trained
  with pytest.raises(ResumeMismatchError, match=r"batch_size: checkpoint was trained with "
                     r"16, the config has 8 \(the steps per epoch"):
    train.train_and_evaluate(tiny_config(**{"num_epochs": 1, "batch_size": 8}), workdir)
  # The order of the examples: refused on both data paths (the streamed loader used the
  # checkpoint's, the on-device epoch the config's, and neither said so).
  for change in ({"seed": 1}, {"data.shuffle": False}):
    key = next(iter(change))
    with pytest.raises(ResumeMismatchError, match=rf"{key}: checkpoint was trained with .* "
                       r"\(the order of the examples would change\)"):
      train.train_and_evaluate(tiny_config(**{"num_epochs": 2, **change}), workdir)
  # A checkpoint from before the schedule recorded the order: its loader's record is read.
  old = {"schedule": {"batch_size": 16}, "loader": {"epoch": 1, "step": 0, "seed": 0,
                                                    "shuffle": True}}
  assert run_lib.saved_schedule(old) == {"batch_size": 16, "seed": 0, "data.shuffle": True}
  with pytest.raises(ResumeMismatchError, match=r"seed: checkpoint was trained with 0, the "
                     r"config has 1"):
    run_lib.check_schedule(run_lib.saved_schedule(old), tiny_config(seed=1), where="x")
  said = []
  monkeypatch.setattr(loop_lib, "log", lambda msg, *a: said.append(msg % a))
  train.train_and_evaluate(tiny_config(**{"num_epochs": 2, "optim.schedule": "cosine"}),
                           workdir)
  (line,) = [m for m in said if "changed schedule" in m]
  assert "num_epochs 1 -> 2" in line and "optim.schedule 'constant' -> 'cosine'" in line


class _Calls(actions_lib.PeriodicAction):
  """A user's action that keeps its state in ``loop.meta`` (the checkpoint records it)."""

  def __call__(self, loop, step):
    loop.meta["my_calls"] = [*loop.meta.get("my_calls", []), step]


def test_a_user_actions_state_in_meta_is_in_the_checkpoint_of_its_step(tmp_path):
  """User actions run before the checkpoint of their step: a resume from it has their state
  of that step (they ran after it, and the firing at a checkpoint's step was lost)."""
  config = tiny_config(num_epochs=1, checkpoint_every_steps=4)
  workdir = tmp_path / "run"
  with pytest.raises(preemption.Preempted, match=r"saved .*checkpoints/4 at step 4"):
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir),
                             actions=[_Calls(every_steps=2), _SignalAt(4)])
  assert checkpoints.Checkpointer(workdir, read_only=True).read_meta()["my_calls"] == [2, 4]
  saved = []

  class AfterSave(actions_lib.PeriodicAction):  # acts on the checkpoint just saved
    after_checkpoint = True

    def __call__(self, loop, step):
      saved.append((step, loop.saved_at))

  train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir),
                           actions=[_Calls(every_steps=2), AfterSave(every_steps=1)])
  assert checkpoints.Checkpointer(workdir, read_only=True).read_meta()["my_calls"] == [2, 4, 6]
  assert saved == [(5, None), (6, 6)]  # resumed at 4; step 6 (the last) saved before it ran


def test_an_at_end_user_action_fires_at_an_early_stop(tmp_path, monkeypatch):
  from dsf3n_jax.training import loop as loop_lib
  real = loop_lib.Loop.select

  def select(self, step, *, early_stopping=True):  # no improvement after epoch 1, say
    real(self, step, early_stopping=early_stopping)
    if step == 6 and early_stopping:
      self.meta["evals_without_improvement"], self.stopping = 1, True

  monkeypatch.setattr(loop_lib.Loop, "select", select)
  config = tiny_config(num_epochs=3, early_stopping_patience=1, eval_every_epochs=1)
  results = train.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path),
                                     actions=[_Calls(at_end=True)])
  assert results["stopped_early"] and results["steps"] == 6
  assert checkpoints.Checkpointer(tmp_path, read_only=True).read_meta()["my_calls"] == [6]


def test_a_failing_user_action_names_the_checkpoint_still_being_saved(tmp_path):
  class Fails(actions_lib.PeriodicAction):
    def __call__(self, loop, step):
      if step == 5:
        raise RuntimeError("my action failed")

  config = tiny_config(num_epochs=1, checkpoint_every_steps=4)
  with pytest.raises(RuntimeError, match="my action failed") as failed:
    train.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "run"),
                             actions=[Fails(every_steps=1)])
  assert failed.value.__notes__ == [
      f"last intact checkpoint: {tmp_path / 'run' / 'checkpoints' / '4'}"]
  assert not (tmp_path / "run" / "lock").exists()


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_the_rates_leave_out_the_compiling_step_and_are_each_epochs_own(tmp_path, monkeypatch,
                                                                        on_device):
  """The loop's clock made to say: 100 s for the first call of steps (its compile), 10 ms for
  each step after it. The first step is timed alone and out of every rate."""
  from dsf3n_jax.training import loop as loop_lib
  steps, calls, clock = loop_lib.Loop._steps, [], [0.0]

  def timed(self, step, stop):
    calls.append((step, stop))
    reached = steps(self, step, stop)
    clock[0] += 100.0 if len(calls) == 1 else 0.01 * (reached - step)
    return reached

  monkeypatch.setattr(loop_lib.Loop, "_steps", timed)
  monkeypatch.setattr(loop_lib, "time", types.SimpleNamespace(time=lambda: clock[0]))
  config = tiny_config(num_epochs=2, **{"data.on_device": on_device})
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert calls[0] == (0, 1)  # the first step alone
  assert results["first_step_s"] == 100.0
  assert results["train_time_s"] == pytest.approx(100.11)  # every step (12 of 16 samples)
  assert results["samples_per_second"] == pytest.approx(1600)  # of the 11 after the first
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  rates = [(r["epoch"], r["samples_per_second"], r["seconds_per_step"]) for r in records
           if r["split"] == "train"]
  assert rates == [(1, pytest.approx(1600), pytest.approx(0.01)),  # 5 steps after the first
                   (2, pytest.approx(1600), pytest.approx(0.01))], rates


def test_a_signal_during_the_first_step_stops_after_it(tmp_path, monkeypatch):
  """The first step runs alone (its compile timed apart): a signal that came during it stops
  the run at the boundary after it, not one step later."""
  from dsf3n_jax.training import loop as loop_lib
  steps = loop_lib.Loop._steps

  def signalled_first(self, step, stop):
    if not hasattr(self, "_signalled"):
      self._signalled = True
      os.kill(os.getpid(), signal.SIGTERM)
    return steps(self, step, stop)

  monkeypatch.setattr(loop_lib.Loop, "_steps", signalled_first)
  with pytest.raises(preemption.Preempted, match=r"saved .*checkpoints/1 at step 1 "):
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path / "run"))


class _Killed(BaseException):
  """What a SIGKILL leaves on disk, in this process: nothing after the call that raises it."""


def _row_keys(workdir):
  return [(r["step"], r["split"], r.get("final")) for r in
          map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def test_a_run_resumed_with_fewer_epochs_keeps_the_periodic_row_of_its_last_step(tmp_path):
  """Stopped at the end of epoch 2 of 3 and resumed with ``num_epochs=2``, the run ends at the
  step it stopped at: its final evaluation is a record beside that step's periodic one (this
  version's unmarked records are periodic), not in its place."""
  config = tiny_config(num_epochs=3, eval_every_epochs=1, checkpoint_every_epochs=1)
  workdir = tmp_path / "run"
  with pytest.raises(preemption.Preempted):
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir),
                             actions=[_SignalAt(12)])
  before = _row_keys(workdir)
  assert before == [(6, "train", None), (6, "test", None), (12, "train", None),
                    (12, "test", None)]
  config.num_epochs = 2
  train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
  after = _row_keys(workdir)
  assert after[:4] == before and [key[:2] for key in after[4:]] == [(12, "test")]
  assert after[4][2]  # the final one, marked


@SHARES_PLAIN_RUN
def test_a_final_evaluation_made_again_after_a_kill_rewrites_its_row(tmp_path, plain_run,
                                                                     monkeypatch):
  """A finished run rerun with an evaluator added writes that evaluator's final row; killed
  before the checkpoint records the evaluation, the next rerun makes it again and rewrites
  that row instead of writing a second. So does a checkpoint of a version that recorded no
  final evaluations (nor marked their rows) left at its last step without results.json."""
  from dsf3n_jax.training import loop as loop_lib
  config = tiny_config(num_epochs=1)
  workdir = tmp_path / "run"
  plain_run(workdir)  # ``config``, trained
  first = _row_keys(workdir)
  assert [key[:2] for key in first] == [(6, "train"), (6, "test")]
  more = config.copy_and_resolve_references()
  more.evals["test_loss"] = {"type": "loss", "split": "test"}

  def killed(self):
    raise _Killed("SIGKILL before the checkpoint records the final evaluation")

  monkeypatch.setattr(loop_lib.Loop, "_record_final_evals", killed)
  with pytest.raises(_Killed):
    train.train_and_evaluate(more.copy_and_resolve_references(), str(workdir))
  monkeypatch.undo()
  (added,) = _row_keys(workdir)[len(first):]
  assert added[:2] == (6, "test_loss")
  for _ in range(2):  # made again once (its row rewritten), then recorded: nothing more
    train.train_and_evaluate(more.copy_and_resolve_references(), str(workdir))
    assert _row_keys(workdir) == [*first, added]
  # A version before the record: no final evaluations in the checkpoint, no "final" in the
  # rows, and no results.json (killed after the last checkpoint). Made again, in their rows.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  (workdir / "metrics.jsonl").write_text("".join(
      json.dumps({k: v for k, v in r.items() if k != "final"}) + "\n" for r in rows))
  (workdir / "results.json").unlink()
  _rewrite_final_meta(workdir, lambda meta: [meta.pop(k) for k in (
      "final_evals", "final_eval_settings", loop_lib.FINALS_MARKED)])
  for _ in range(2):
    results = train.train_and_evaluate(more.copy_and_resolve_references(), str(workdir))
    assert _row_keys(workdir) == [*first, added]
    assert set(results["final"]) == {"test", "test_loss"}
  # The final rows are marked (a digest of the settings they were made with).
  assert [bool(final) for _, _, final in _row_keys(workdir)] == [False, True, True]


def test_a_later_run_of_the_process_reuses_the_train_programs_and_ends_the_same(tmp_path,
                                                                                capfd,
                                                                                monkeypatch):
  """Runs whose configs differ only in what the loop reads (``loop.LOOP_FIELDS``, and
  ``num_epochs`` under a constant schedule) train with the programs the first one compiled:
  the step is not traced again, and the run ends bit for bit as the first."""
  from dsf3n_jax.training import loop as loop_lib
  from dsf3n_jax.training import steps as steps_lib
  real, traced = steps_lib.train_step, []

  def counted(*args, **kwargs):
    traced.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(steps_lib, "train_step", counted)
  # A learning rate of no other test: this process has not built its programs yet.
  first = tiny_config(num_epochs=1, **{"optim.lr": 1.25e-3})
  train.train_and_evaluate(first, str(tmp_path / "first"))
  assert traced and "compiling the train step" in capfd.readouterr().err
  first_traces = len(traced)
  other = tiny_config(num_epochs=1, log_every_steps=3, checkpoint_every_epochs=2,
                      eval_every_epochs=2, keep_checkpoints=1, **{"optim.lr": 1.25e-3})
  assert loop_lib.programs_key(other) == loop_lib.programs_key(first)
  train.train_and_evaluate(other, str(tmp_path / "reused"))
  assert len(traced) == first_traces  # nothing traced again
  assert "reusing (compiled by an earlier run of this process) the train step" in (
      capfd.readouterr().err)
  reused, own = _params(tmp_path / "reused"), _params(tmp_path / "first")
  for key in own:
    np.testing.assert_array_equal(reused[key], own[key], err_msg=key)


def test_programs_are_shared_only_by_configs_of_the_same_programs():
  from dsf3n_jax.training import loop as loop_lib
  from dsf3n_jax.training import state as state_lib
  base = tiny_config(num_epochs=2)
  key = loop_lib.programs_key
  defaults = base.to_dict()
  for field in loop_lib.LOOP_FIELDS:  # each a field the config has (a renamed one would rot)
    assert field in defaults, field
  # What a program bakes in: the rates, the loss's weights, the model, the data's order...
  for change in ({"optim.lr": 3e-3}, {"loss.terms": {"id": 1.0, "pair": 1e-4}},
                 {"model.embed_dim": 8}, {"seed": 1}, {"batch_size": 8},
                 {"data.shuffle": False}, {"steps_per_call": 2}):
    assert key(tiny_config(num_epochs=2, **change)) != key(base), change
  # ...and the run's length, where the schedule reads it.
  assert key(tiny_config(num_epochs=2, **{"optim.schedule": "cosine"})) != key(
      tiny_config(num_epochs=3, **{"optim.schedule": "cosine"}))
  assert key(tiny_config(num_epochs=3)) == key(base)
  # Which schedules read it: the others give the same rate at every step of any length.
  steps = np.arange(0, 400, 7)
  for schedule in ("constant", "warmup_step", "cosine"):
    short, long = (np.asarray(state_lib.learning_rate_schedule(
        tiny_config(num_epochs=n, **{"optim.schedule": schedule}), 6)(steps)) for n in (2, 60))
    reads = schedule in state_lib.SCHEDULES_READING_NUM_EPOCHS
    assert (not np.array_equal(short, long)) == reads, schedule


def test_a_part_registered_again_makes_memoized_programs_anew(monkeypatch):
  """A module reloaded after an edit registers its parts again under their names: equal
  models then stand for other code, so what ``memoized`` built for them is built anew."""
  import dsf3n_jax.registry
  from dsf3n_jax.models import registry
  from dsf3n_jax.training import state as state_lib
  monkeypatch.setattr(dsf3n_jax.registry, "_REGISTRY",  # the test's registrations: its own
                      {kind: dict(parts) for kind, parts in dsf3n_jax.registry._REGISTRY.items()})
  built = []
  build = state_lib.memoized(lambda name: built.append(name) or len(built))

  def reloaded():
    def reload_me_head(model):  # the same module and qualified name each time
      return model

    return reload_me_head

  registry.register("head", "reload_me_head")(reloaded())
  assert build("x") == build("x") == 1
  registry.register("head", "reload_me_head")(registry.lookup("head", "reload_me_head"))
  assert build("x") == 1  # the same object again: nothing changed
  registry.register("head", "reload_me_head")(reloaded())
  assert build("x") == 2 and build("x") == 2
  state_lib.forget_programs()
  assert build("x") == 3


def test_a_restores_target_is_the_initial_states_shapes_traced_once_per_model(monkeypatch):
  """``state.abstract_state``, what a resume and the tools restore into: the shapes, dtypes
  and tree of ``init_state``'s state for the run's optimiser; the model's draws traced once
  for equal models (the optimiser's state, a small trace, for each call)."""
  import jax

  from dsf3n_jax.training import state as state_lib
  config = tiny_config()
  run = run_lib.prepare_run(config)
  kwargs = dict(num_classes=run.sources.num_classes, loss_terms=config.loss.terms)
  state_lib.forget_programs()
  traced, real = [], state_lib._init_without_optimizer
  monkeypatch.setattr(state_lib, "_init_without_optimizer",
                      lambda *a, **k: traced.append(a[0]) or real(*a, **k))
  for optimizer in ({}, {"optim.grad_clip_norm": 1.0, "optim.weight_decay": 1e-3}):
    tx = state_lib.build_optimizer(tiny_config(**optimizer), 6)
    got = state_lib.abstract_state(run.model, tx, **kwargs)
    want = jax.eval_shape(lambda tx=tx: state_lib.init_state(run.model, tx, seed=3, **kwargs))
    assert jax.tree.structure(got) == jax.tree.structure(want), optimizer
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(want)], optimizer
  assert len(traced) == 3  # the model's draws: once for abstract_state, twice for eval_shape
  other = run.model.clone(embed_dim=run.model.embed_dim * 2)
  wider = state_lib.abstract_state(other, tx, **kwargs)
  assert len(traced) == 4 and wider.params != got.params
  state_lib.forget_programs()
