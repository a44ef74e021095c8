"""Failure paths of a run: no hang, one writer per workdir, only good checkpoints, resumes."""

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dsf3n_jax import checkpoints, config_check, train
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import steps as steps_lib
from dsf3n_jax.training import workdir as workdir_lib
from dsf3n_jax.training.preemption import Preempted
from tests.test_loop import SHARES_PLAIN_RUN
from tests.test_train import REPO, _env, tiny_config

# A run that fails must end well inside this (a hang fails the test instead of the suite).
EXIT_TIMEOUT_S = 240


def _argv(workdir, *extra):
  # Run in test_train's command-line environment (``_env``: two devices); the runs of this file
  # share their programs through the suite's compilation cache.
  return ["--config=configs/synthetic.py:runlocal,tiny", f"--workdir={workdir}",
          "--config.data.synthetic.num_train=128", "--config.data.synthetic.num_test=40",
          "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_epochs=2",
          "--config.eval_every_epochs=1", "--config.checkpoint_every_epochs=1", *extra]


def _main(workdir, *extra, inject: str = "", timeout: float = EXIT_TIMEOUT_S):
  """``python -m dsf3n_jax.main`` after ``inject`` (Python run first, e.g. a patch)."""
  code = textwrap.dedent(inject) + textwrap.dedent("""
      import sys
      from dsf3n_jax import main
      sys.argv = ["dsf3n_jax.main"] + sys.argv[1:]
      main.run()
      """)
  return subprocess.run([sys.executable, "-c", code, *_argv(workdir, *extra)], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=timeout)


def _error_line(proc) -> str:
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


# -- every exit path ends the process --------------------------------------------------------

_FAIL_MKDIR_UNDER = """
    import errno, os
    _real_mkdir = os.mkdir
    def _mkdir(path, *args, **kwargs):
      path = os.fspath(path)
      if "/checkpoints/" in path and {after_first}:
        raise OSError({errno_}, os.strerror({errno_}), path)
      return _real_mkdir(path, *args, **kwargs)
    os.mkdir = _mkdir
    """


def test_a_failing_checkpoint_save_ends_the_run(tmp_path):
  """checkpoints/ refuses writes: exit 1 (within _main's timeout), no checkpoint to name. (A full
  disk takes the same path: after a good checkpoint in
  test_a_save_failing_after_a_good_checkpoint_names_it, a real one in
  test_a_full_disk_ends_the_run.)"""
  code = errno.EACCES
  inject = _FAIL_MKDIR_UNDER.format(errno_=code, after_first="True")
  proc = _main(tmp_path / "run", inject=inject)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _error_line(proc)
  assert os.strerror(code) in line and "last intact checkpoint: none" in line, line
  assert not (tmp_path / "run" / "results.json").exists()
  assert not (tmp_path / "run" / "lock").exists()  # released on the way out


def test_a_save_failing_after_a_good_checkpoint_names_it(tmp_path):
  inject = _FAIL_MKDIR_UNDER.format(  # once checkpoint 7 (epoch 1) is complete, the disk is full
      errno_=errno.ENOSPC,
      after_first="os.path.isdir(path.split('/checkpoints/')[0] + '/checkpoints/7')")
  proc = _main(tmp_path / "run", inject=inject)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _error_line(proc)
  assert "No space left on device" in line, line
  assert f"last intact checkpoint: {tmp_path / 'run' / 'checkpoints' / '7'}" in line, line
  assert not (tmp_path / "run" / "results.json").exists()


def test_an_unwritable_tensorboard_dir_ends_the_run(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "tensorboard").write_text("a file where the folder should be")
  proc = _main(workdir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "tensorboard" in _error_line(proc)


def test_a_full_disk_ends_the_run(tmp_path):
  """A real full file system (a 2 MiB tmpfs) when this machine lets us mount one."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here; an injected ENOSPC covers this path "
                "(test_a_save_failing_after_a_good_checkpoint_names_it)")
  try:
    proc = _main(mount / "run")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _error_line(proc)
    assert "No space left on device" in line or "ENOSPC" in line, line
    assert proc.stderr.count("\n") < 40, proc.stderr  # no flood of tracebacks
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


# -- one writer per workdir ------------------------------------------------------------------

# A run held at its start once it holds its workdir's lock (restoring or compiling for long, as
# it were): a live owner of the lock that takes no CPU from the runs started beside it.
_HELD_AT_ITS_START = """
    import threading
    from dsf3n_jax.training import loop as _loop
    def _held(*args, **kwargs):
      threading.Event().wait()
    _loop._init_or_resume = _held
    """


def test_a_second_run_into_a_live_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
  workdir = tmp_path / "run"
  code = textwrap.dedent(_HELD_AT_ITS_START) + textwrap.dedent("""
      import sys
      from dsf3n_jax import main
      sys.argv = ["dsf3n_jax.main"] + sys.argv[1:]
      main.run()
      """)
  first = subprocess.Popen(
      [sys.executable, "-c", code, *_argv(workdir, "--config.num_epochs=50")],
      cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + EXIT_TIMEOUT_S
    while not (workdir / "lock").exists() and time.time() < deadline and first.poll() is None:
      time.sleep(0.2)
    assert first.poll() is None, first.stderr.read()[-3000:]
    second = _main(workdir)
    assert second.returncode == 1, second.stderr[-3000:]
    line = _error_line(second)
    assert f"in use by pid {first.pid} on host {socket.gethostname()}" in line, line
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The killed run's lock is stale now: the next run takes it over and finishes.
  assert json.loads((workdir / "lock").read_text())["pid"] == first.pid
  third = _main(os.path.relpath(workdir, REPO), "--config.num_epochs=1")  # relative
  assert third.returncode == 0, third.stderr[-3000:]
  assert f"taking over the stale lock {workdir / 'lock'} of pid {first.pid}" in third.stderr
  assert not (workdir / "lock").exists()


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_or_reused_pid(tmp_path):
  path = tmp_path / "lock"
  host = socket.gethostname()
  path.write_text(json.dumps({"pid": os.getpid(), "host": host,
                              "start_time": workdir_lib._start_time(os.getpid())}))
  with pytest.raises(workdir_lib.WorkdirError, match=f"in use by pid {os.getpid()} on host"):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  path.write_text(json.dumps({"pid": 12345678, "host": "elsewhere"}))  # another host: alive
  with pytest.raises(workdir_lib.WorkdirError, match="on host elsewhere"):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  for owner in ({"pid": 2 ** 22 + 7, "host": host},  # no such process
                {"pid": os.getpid(), "host": host, "start_time": "0"},  # pid reused since
                "{half-written"):
    path.write_text(owner if isinstance(owner, str) else json.dumps(owner))
    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


# -- only good checkpoints ---------------------------------------------------------------------

def _run(config, workdir):
  return train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))


def _checkpoints(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def test_a_non_finite_evaluation_is_never_saved_or_best(tmp_path, monkeypatch):
  config = tiny_config(num_epochs=3, eval_every_epochs=1, checkpoint_every_epochs=1,
                       keep_checkpoints=3)
  real = steps_lib.evaluate
  calls = []

  def evaluate(*args, **kwargs):
    values = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:  # epoch 2: finite training loss, NaN evaluation (lr too high)
      values = {**values, "loss": float("nan"), "map_average": float("nan")}
    return values

  monkeypatch.setattr(steps_lib, "evaluate", evaluate)
  with pytest.raises(FloatingPointError, match=r"non-finite test evaluation after epoch 2 .*"
                     r"not saved; last good checkpoint: .*checkpoints/6"):
    _run(config, tmp_path / "run")
  assert _checkpoints(tmp_path / "run") == [6]  # named by step: 6 steps per epoch
  meta = checkpoints.Checkpointer(tmp_path / "run", read_only=True).read_meta()
  assert meta["best"]["epoch"] == 1 and np.isfinite(meta["best"]["value"])
  assert not (tmp_path / "run" / "results.json").exists()


def test_best_shares_the_latest_files_and_results_name_complete_checkpoints(tmp_path):
  config = tiny_config(num_epochs=3, eval_every_epochs=1, checkpoint_every_epochs=1,
                       keep_checkpoints=1)
  results = _run(config, tmp_path / "run")
  best = results["best"]["epoch"]
  # One manager: the latest checkpoint and the best one; no copy when they coincide.
  assert _checkpoints(tmp_path / "run") == sorted({18, 6 * best})
  assert not (tmp_path / "run" / "best").exists()
  _, variables, _ = train.restore_model(str(tmp_path / "run"), which="best")
  assert set(variables) == {"params", "batch_stats"}


def test_a_resume_repairs_a_missing_best_checkpoint(tmp_path, monkeypatch, capfd):
  workdir = tmp_path / "run"
  config = tiny_config(num_epochs=2, eval_every_epochs=1, checkpoint_every_epochs=1,
                       keep_checkpoints=1)
  real = steps_lib.evaluate
  scores = iter([0.9, 0.5])  # epoch 1 is the best, epoch 2 the latest: both kept

  def evaluate(*args, **kwargs):
    return {**real(*args, **kwargs), "map_average": next(scores)}

  monkeypatch.setattr(steps_lib, "evaluate", evaluate)
  _run(config, workdir)
  monkeypatch.setattr(steps_lib, "evaluate", real)
  assert _checkpoints(workdir) == [6, 12]
  shutil.rmtree(workdir / "checkpoints" / "6")  # lost, as a kill during a best save used to
  capfd.readouterr()
  rows = (workdir / "metrics.jsonl").read_text()
  results = _run(config, workdir)
  assert "the best checkpoint (epoch 1) is missing" in capfd.readouterr().err
  assert results["best"]["epoch"] == 2 and _checkpoints(workdir) == [12]
  train.restore_model(str(workdir), which="best")
  # The finished run's final evaluation, recorded in its checkpoint, is what it selects on:
  # not made (nor written) again.
  assert results["best"]["test"] == results["final"]["test"]
  assert (workdir / "metrics.jsonl").read_text() == rows


def test_a_repair_of_a_missing_best_rewrites_the_row_of_the_restored_step(tmp_path,
                                                                         monkeypatch):
  """Mid-run (a preempted run) the repair evaluates the restored step again: its row is
  rewritten, not written twice. A finished run resumed for more epochs takes its recorded
  final evaluation (nothing evaluated or written again)."""
  from tests.test_loop import _row_keys, _SignalAt
  workdir = tmp_path / "run"
  config = tiny_config(num_epochs=3, eval_every_epochs=1, checkpoint_every_epochs=1,
                       keep_checkpoints=1)
  real = steps_lib.evaluate
  scores = iter([0.9, 0.5, 0.4, 0.3, 0.1, 0.1])

  def evaluate(*args, **kwargs):
    return {**real(*args, **kwargs), "map_average": next(scores)}

  monkeypatch.setattr(steps_lib, "evaluate", evaluate)
  with pytest.raises(Preempted, match=r"saved .*checkpoints/12 at epoch 2"):
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir),
                             actions=[_SignalAt(12)])
  assert _checkpoints(workdir) == [6, 12]
  shutil.rmtree(workdir / "checkpoints" / "6")
  results = _run(config, workdir)  # the repair evaluates step 12 again (0.4): the best
  assert (results["best"]["step"], results["best"]["value"]) == (12, 0.4)
  keys = [key[:2] for key in _row_keys(workdir)]
  assert keys == [(6, "train"), (6, "test"), (12, "train"), (12, "test"), (18, "train"),
                  (18, "test")]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[3]["map_average"] == 0.4  # the repair's, in place of the one it made again
  assert _checkpoints(workdir) == [12, 18]
  shutil.rmtree(workdir / "checkpoints" / "12")
  more = _run(tiny_config(num_epochs=4, eval_every_epochs=1, checkpoint_every_epochs=1,
                          keep_checkpoints=1), workdir)
  assert (more["best"]["step"], more["best"]["value"]) == (18, 0.3)
  assert [key[:2] for key in _row_keys(workdir)] == keys + [(24, "train"), (24, "test")]
  # Only the final evaluations' rows are marked: the last step's of each run.
  assert [bool(final) for _, _, final in _row_keys(workdir)] == [False] * 5 + [True, False,
                                                                               True]


def test_repairing_a_missing_best_does_not_count_toward_early_stopping(tmp_path, monkeypatch):
  """The repair selects the restored state as the best again (the finished run's recorded
  final evaluations taken as they are); the uninterrupted run did not, so its early-stopping
  count must not grow (it stopped the resumed run at once)."""
  workdir = tmp_path / "run"
  config = tiny_config(num_epochs=2, eval_every_epochs=1, checkpoint_every_epochs=1,
                       keep_checkpoints=1, early_stopping_patience=2)
  real, calls = steps_lib.evaluate, []

  def evaluate(*args, **kwargs):  # epoch 1: the best and the lowest loss; later ones worse
    calls.append(1)
    return {**real(*args, **kwargs), "map_average": 0.9 if len(calls) == 1 else 0.5,
            "loss": 1.0 if len(calls) == 1 else 2.0}

  monkeypatch.setattr(steps_lib, "evaluate", evaluate)
  first = _run(config, workdir)
  assert first["steps"] == 12 and not first["stopped_early"]  # one evaluation without a lower
  shutil.rmtree(workdir / "checkpoints" / "6")
  resumed = _run(tiny_config(num_epochs=3, eval_every_epochs=1, checkpoint_every_epochs=1,
                             keep_checkpoints=1, early_stopping_patience=2), workdir)
  assert resumed["steps"] == 18  # epoch 3 trained: the repair's evaluation was not counted
  assert resumed["best"]["epoch"] == 2


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
  workdir = tmp_path / "run"
  config = tiny_config(num_epochs=2, eval_every_epochs=1, checkpoint_every_epochs=1,
                       keep_checkpoints=2)
  _run(config, workdir)
  state_dir = workdir / "checkpoints" / "12" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0garbage")
  capfd.readouterr()
  config.num_epochs = 3
  results = _run(config, workdir)
  err = capfd.readouterr().err
  fallback = [line for line in err.splitlines() if "is unreadable" in line]
  assert len(fallback) == 1 and f"{workdir / 'checkpoints' / '12'}" in fallback[0], err
  assert "falling back" in fallback[0] and "resumed from" in err
  assert results["epochs"] == 3 and 18 in _checkpoints(workdir)
  # The unreadable files are kept aside, under a name the manager does not read.
  assert (workdir / "checkpoints" / "12.unreadable" / "state").is_dir()
  assert f"is kept as {workdir / 'checkpoints' / '12.unreadable'}" in err


@SHARES_PLAIN_RUN
def test_a_resume_with_a_state_of_another_structure_names_the_change_and_deletes_nothing(
    tmp_path, plain_run):
  """Clipping adds a transformation to the optimiser, so its state: the intact checkpoint is
  refused (not taken for a broken file, set aside and trained again)."""
  workdir = tmp_path / "run"
  assert tiny_config(num_epochs=1).keep_checkpoints == 2
  plain_run(workdir)  # tiny_config(num_epochs=1, keep_checkpoints=2), trained
  clipped = tiny_config(num_epochs=2, keep_checkpoints=2)
  clipped.optim.grad_clip_norm = 1.0
  with pytest.raises(run_lib.ResumeMismatchError, match=r"cannot resume .*checkpoints/6: its "
                     r"state has another structure .*optim.grad_clip_norm 0.0 -> 1.0"):
    _run(clipped, workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]


@SHARES_PLAIN_RUN
def test_garbage_checkpoint_metadata_is_named(tmp_path, plain_run):
  workdir = tmp_path / "run"
  plain_run(workdir)  # tiny_config(num_epochs=1), trained
  meta_dir = workdir / "checkpoints" / "6" / "meta"
  for f in meta_dir.iterdir():
    f.write_text("{not json")
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/6/meta: unreadable"):
    checkpoints.Checkpointer(workdir, read_only=True).read_meta()
  with pytest.raises(checkpoints.CheckpointError, match=r"no readable checkpoint.*6: "):
    train.restore_model(str(workdir))


# -- resumes on other data or another loss are refused ---------------------------------------

@SHARES_PLAIN_RUN
def test_a_resume_on_other_data_or_loss_is_refused_naming_both(tmp_path, plain_run):
  workdir = tmp_path / "run"
  config = tiny_config(num_epochs=1)
  plain_run(workdir)  # ``config``, trained
  config.num_epochs = 2
  other_data = config.copy_and_resolve_references()
  other_data.data.synthetic.num_train = 80
  with pytest.raises(run_lib.ResumeMismatchError, match=r"data: checkpoint was trained on .*"
                     r"'train': 96.*the config gives .*'train': 80.*allow_resume_mismatch"):
    _run(other_data, workdir)
  other_loss = config.copy_and_resolve_references()
  other_loss.loss.terms.pair = 0.5
  with pytest.raises(run_lib.ResumeMismatchError, match=r"loss: .*'pair': 0.0001.*'pair': 0.5"):
    _run(other_loss, workdir)
  other_loss.allow_resume_mismatch = True  # deliberately, e.g. to fine-tune
  assert _run(other_loss, workdir)["epochs"] == 2


def test_the_fingerprint_hashes_a_feature_file(tmp_path):
  config = tiny_config()
  sources = run_lib.load_data(config)
  a = run_lib.data_fingerprint(config, sources)
  assert a["synthetic"]["num_train"] == 96 and a["sizes"] == {"train": 96, "test": 40}
  path = tmp_path / "f.bin"
  path.write_bytes(b"abc")
  config.data.path = str(path)
  b = run_lib.data_fingerprint(config, sources)
  assert b["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# -- disk: checkpoints without the optimiser state -------------------------------------------

def _size(folder) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(folder).rglob("*") if f.is_file())


@SHARES_PLAIN_RUN
def test_checkpoints_without_optimizer_state_are_smaller_and_resume(tmp_path, plain_run, capfd):
  config = tiny_config(num_epochs=1)
  plain_run(tmp_path / "full")  # ``config``, trained
  config.checkpoint_optimizer_state = False
  _run(config, tmp_path / "lean")
  full = _size(tmp_path / "full" / "checkpoints" / "6")
  lean = _size(tmp_path / "lean" / "checkpoints" / "6")
  # Adam's two moments are twice the parameters. The bytes on disk are a noisy measure (OCDBT
  # appends data files; seen: lean/full 0.27 to 0.66 for the same runs), so the arrays saved
  # are counted from the checkpoint's tree as well.
  assert lean < full, (lean, full)
  saved = {run: [k for k in json.loads((tmp_path / run / "checkpoints" / "6" / "state" /
                                         "_METADATA").read_text())["tree_metadata"]]
           for run in ("full", "lean")}
  optimizer_arrays = {run: [k for k in keys if k.startswith("('opt_state', ")]
                      for run, keys in saved.items()}
  assert optimizer_arrays["lean"] == [], optimizer_arrays["lean"]  # only a None placeholder
  assert len(optimizer_arrays["full"]) >= 2 * len([k for k in saved["lean"]
                                                   if k.startswith("('params', ")])
  capfd.readouterr()
  config.num_epochs = 2
  assert _run(config, tmp_path / "lean")["epochs"] == 2
  assert "the optimiser starts afresh" in capfd.readouterr().err


# -- progress ----------------------------------------------------------------------------------

def _scalars(event_dir) -> dict[str, list[float]]:
  """Scalars of TensorBoard event files (TFRecord framing, tensorboardX's protos)."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[float]] = {}
  for path in pathlib.Path(event_dir).glob("events*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(value.simple_value)
  return out


def test_progress_says_compiling_and_tensorboard_has_rate_and_learning_rate(tmp_path, capfd):
  from dsf3n_jax.training import state as state_lib
  config = tiny_config(num_epochs=2, log_every_steps=2)
  config.optim.schedule = "cosine"
  state_lib.forget_programs()  # as in a new process: no earlier run's step to reuse
  _run(config, tmp_path / "run")
  err = capfd.readouterr().err
  assert "compiling the train step" in err
  assert err.index("compiling the train step") < err.index("epoch 1 step 2/")
  scalars = _scalars(tmp_path / "run" / "tensorboard")
  assert len(scalars["train/samples_per_second"]) == 2
  lr = scalars["train/learning_rate"]
  assert lr[0] > lr[1] > 0  # cosine decay, read at each epoch's last step


def test_config_errors_before_anything_compiles_are_listed_together():
  config = tiny_config().to_dict()  # a dict: ConfigDict itself refuses a str for a bool
  config.update(keep_checkpoints=0, checkpoint_optimizer_state="yes", allow_resume_mismatch=1)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(config, num_devices=1)
  assert {p.split("=")[0] for p in e.value.problems} == {
      "config.keep_checkpoints", "config.checkpoint_optimizer_state",
      "config.allow_resume_mismatch"}


def test_a_checkpoint_from_before_loss_terms_resumes_with_the_same_terms():
  now = tiny_config().loss.to_dict()  # terms {id 1, pair 1e-4, center 5e-4}, no unimodal ones
  # Saved before config.loss.terms (and, the first, before config.loss.id_weight) existed.
  for old in ({"alpha": 1e-4, "beta": 5e-4, "id_form": "ce", "unimodal_weight": 0.0},
              {"alpha": 1e-4, "beta": 5e-4, "id_form": "ce", "id_weight": 1.0,
               "unimodal_weight": 0.0, "unimodal_alpha": -1.0, "unimodal_beta": -1.0}):
    run_lib.check_resume({"loss": old}, fingerprint={}, loss=now, where="w")
  changed = {**now, "terms": {**now["terms"], "id": 0.0}}
  with pytest.raises(run_lib.ResumeMismatchError, match="'id': 1.0.*'id': 0.0"):
    run_lib.check_resume({"loss": {"alpha": 1e-4, "beta": 5e-4, "id_form": "ce",
                                   "unimodal_weight": 0.0}}, fingerprint={}, loss=changed,
                         where="w")
  unimodal = {"alpha": 1e-4, "beta": 5e-4, "id_form": "ce", "unimodal_weight": 1.0,
              "unimodal_alpha": -1.0, "unimodal_beta": 0.3}
  run_lib.check_resume({"loss": unimodal}, fingerprint={}, where="w", loss={
      **now, "unimodal_weight": 1.0, "unimodal_terms": {"center": 0.3}})


def test_a_workdir_that_cannot_be_written_is_refused_before_the_data_is_read(tmp_path,
                                                                            monkeypatch):
  """A parent (or the workdir) that is a file, or a folder this process may not write in: one
  error naming the workdir and why, before the data is read, and no folder made. (As root,
  permission bits say writable whatever they are: os.access answers as for another user.)"""
  def read(*args, **kwargs):
    raise AssertionError("the data was read")

  monkeypatch.setattr(run_lib, "load_data", read)
  mine = tmp_path / "notes.txt"
  mine.write_text("mine")
  for workdir in (mine / "run", mine / "run" / "deeper", mine):
    with pytest.raises(workdir_lib.WorkdirError, match=re.escape(
        f"--workdir={workdir}: not writable ({mine} is a file, not a folder)")):
      train.train_and_evaluate(tiny_config(), str(workdir))
  assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and mine.read_text() == "mine"
  locked = tmp_path / "locked"
  locked.mkdir()
  access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
      os.fspath(path) != str(locked) and access(path, mode, **kwargs)))
  for workdir, reason in (
      (locked / "new" / "run", f"cannot create it: no permission to write in {locked}"),
      (locked, f"no permission to write in {locked}")):
    with pytest.raises(workdir_lib.WorkdirError, match=re.escape(
        f"--workdir={workdir}: not writable ({reason})")):
      train.train_and_evaluate(tiny_config(), str(workdir))
  assert not list(locked.iterdir())


def test_a_failed_start_leaves_no_folder_it_made(tmp_path, bad_npz_files):
  """A start that fails before it wrote anything removes the folders it made (the workdir, its
  parents, checkpoints/), only those and only when empty: a user's folder stays, and so does
  everything in it."""
  from dsf3n_jax.datasets.files import DataValidationError
  bad_data = tiny_config(**{"data.name": "paired_features",
                            "data.path": str(bad_npz_files["random_bytes"]),
                            "data.data_dir": str(tmp_path / "tfds")})
  # After the data was read: no folder made yet. After the initial state was built: the
  # workdir and checkpoints/ were made, and are removed.
  not_reported = tiny_config(selection_metric="test/map_avg")
  cases = [(bad_data, DataValidationError, "random_bytes.npz: unreadable as an .npz"),
           (tiny_config(batch_size=128), ValueError, "batch_size=128 exceeds the 96 training"),
           (not_reported, config_check.ConfigError, "reports no 'map_avg'")]
  for config, error, message in cases:
    with pytest.raises(error, match=re.escape(message)):
      train.train_and_evaluate(config, str(tmp_path / "new" / "parent" / "run"))
    assert not (tmp_path / "new").exists(), message
  user_made = tmp_path / "mine"
  user_made.mkdir()
  with pytest.raises(config_check.ConfigError):
    train.train_and_evaluate(not_reported, str(user_made))
  assert user_made.is_dir() and not list(user_made.iterdir())
  (user_made / "notes.txt").write_text("mine")
  with pytest.raises(config_check.ConfigError):
    train.train_and_evaluate(not_reported, str(user_made / "run"))
  assert [p.name for p in user_made.iterdir()] == ["notes.txt"]
