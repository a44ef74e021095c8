"""Multi-host training with real processes on 127.0.0.1, and the launch scripts."""

import functools
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from dsf3n_jax import train
from tests.test_train import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("local.sh", "tpu_pod.sh", "slurm.sbatch")


def tiny_flags(workdir, *extra):
  return [f"--workdir={workdir}", "--config=configs/synthetic.py:runlocal,tiny",
          "--config.data.synthetic.num_train=128", "--config.data.synthetic.num_test=40",
          "--config.data.validation_fraction=0.0", "--config.batch_size=16",
          "--config.eval_batch_size=16", "--config.num_epochs=2", "--config.eval_every_epochs=2",
          "--config.data.on_device=False", "--config.optim.lr=1e-3", *extra]


def env(devices=None, *, peers=True):
  e = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  if peers:
    # No persistent compilation cache for processes with peers: one that finds the step cached
    # while its peer compiles it reaches the first collective more than gloo's 30 s ahead of it
    # on a busy machine. A single process keeps it.
    e["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  if devices:
    e["XLA_FLAGS"] = xla_flags(devices)
    e["DEVICES_PER_PROCESS"] = str(devices)
  return e


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def local_run(n, devices, flags, timeout=600):
  proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), str(n), *flags], cwd=REPO,
                        env=env(devices), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def single_run(devices, flags, timeout=600):
  proc = subprocess.run([sys.executable, "-m", "dsf3n_jax.main", *flags], cwd=REPO,
                        env=env(devices, peers=False), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def params(workdir):
  _, variables, _ = train.restore_model(str(workdir))
  return traverse_util.flatten_dict(variables["params"], sep="/")


def assert_params_close(a, b, atol=1e-5):
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst < atol, worst


# ----------------------------------------------------------------------------
# Launch scripts.


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_parse_and_pass_shellcheck(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
  shellcheck = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent /
                                                 "shellcheck")
  proc = subprocess.run([shellcheck, str(LAUNCH / script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_launch_scripts_dry_run_print_resolved_commands():
  out = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--tpu=pod", "--zone=us-east5-b",
                        "--workdir=gs://bucket/run", "--dry-run", "--",
                        "--config.num_epochs=3"], capture_output=True, text=True, check=True)
  cmd = out.stdout
  assert "gcloud compute tpus tpu-vm ssh pod --zone=us-east5-b --worker=all" in cmd
  assert "dsf3n_jax.main" in cmd and "gs://bucket/run" in cmd
  assert "--config.num_epochs=3" in cmd
  missing = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--tpu=pod", "--dry-run"],
                           capture_output=True, text=True)
  assert missing.returncode == 2 and "--zone is required" in missing.stderr

  out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--config=configs/vegas.py",
                        "--workdir=/shared/run"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, DRY_RUN="1"))
  assert "srun --gpu-bind=single:1 python -m dsf3n_jax.main --config=configs/vegas.py" in (
      out.stdout)

  out = subprocess.run(["bash", str(LAUNCH / "local.sh"), "2", "--workdir=/tmp/x"],
                       capture_output=True, text=True, check=True,
                       env=dict(os.environ, DRY_RUN="1", PORT="1234"))
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert f"--process_id={i}" in line and "--num_processes=2" in line
    assert "--coordinator_address=127.0.0.1:1234" in line


# ----------------------------------------------------------------------------
# Real processes.


@pytest.mark.slow
def test_two_processes_match_one_process_and_checkpoints_cross_restore(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  local_run(2, 2, tiny_flags(two))  # 2 processes x 2 devices
  single_run(4, tiny_flags(one))  # 1 process x 4 devices
  after_two_epochs = params(one)
  assert_params_close(params(two), after_two_epochs)
  for workdir in (two, one):
    assert (workdir / "results.json").exists() and (workdir / "metrics.jsonl").exists()

  # SIGTERM to process 1 alone (one preempted host) while the step compiles: JAX's preemption
  # notice reaches both, both save the same step and exit with 75; the rerun resumes and ends
  # bit for bit as the uninterrupted two-process run.
  preempted = tmp_path / "preempted"
  port = free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:
      procs.append(_start(i, 2, port, preempted, output=out))
  deadline = time.time() + 300
  while time.time() < deadline and "compiling the train step" not in logs[0].read_text():
    assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    try:
      p.wait(timeout=120)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a process did not stop within 120 s of the SIGTERM")
  assert [p.returncode for p in procs] == [75, 75], logs[0].read_text()[-3000:]
  line = [x for x in logs[0].read_text().splitlines() if x.startswith("preempted:")]
  assert len(line) == 1, logs[0].read_text()[-3000:]
  saved = int(re.search(r"checkpoints/(\d+) at step", line[0]).group(1))
  assert 0 < saved < 16 and (preempted / "checkpoints" / str(saved)).is_dir()
  local_run(2, 2, tiny_flags(preempted))
  a, b = params(two), params(preempted)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  # Each checkpoint resumes in the other topology; both continuations agree.
  single_run(4, tiny_flags(two, "--config.num_epochs=3"))
  local_run(2, 2, tiny_flags(one, "--config.num_epochs=3"))
  a, b = params(two), params(one)
  assert_params_close(a, b)
  assert max(float(np.max(np.abs(a[k] - p))) for k, p in after_two_epochs.items()) > 1e-4


def _start(i, n, port, workdir, *extra, output=subprocess.PIPE):
  cmd = [sys.executable, "-m", "dsf3n_jax.main", f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={n}", f"--process_id={i}", *tiny_flags(workdir, *extra)]
  return subprocess.Popen(cmd, cwd=REPO, env=env(2), stdout=output,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_process_whose_peer_died_exits_within_the_heartbeat_timeout(tmp_path):
  """Process 1 is killed once process 0 has initialised its state and starts compiling the
  train step, whose first collective then has no peer: process 0 must exit, not wait."""
  port = free_port()
  flags = ("--config.distributed.heartbeat_timeout=10", "--config.num_epochs=200")
  log = tmp_path / "process_0.log"
  with open(log, "w") as out:
    procs = [_start(i, 2, port, tmp_path / "run", *flags,
                    output=out if i == 0 else subprocess.DEVNULL) for i in range(2)]
  deadline = time.time() + 300
  while time.time() < deadline and "compiling the train step" not in log.read_text():
    assert all(p.poll() is None for p in procs), log.read_text()[-3000:]
    time.sleep(0.2)
  assert "compiling the train step" in log.read_text(), log.read_text()[-3000:]
  procs[1].kill()
  killed_at = time.time()
  try:
    procs[0].wait(timeout=120)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process hung after its peer died")
  assert procs[0].returncode != 0
  # Within the configured 10 s and a busy machine's slack, far under JAX's default of 100 s.
  assert time.time() - killed_at < 60, time.time() - killed_at
  procs[1].wait()


@pytest.mark.slow
def test_an_unreachable_coordinator_fails_within_the_timeout(tmp_path):
  start = time.time()
  proc = _start(1, 2, free_port(), tmp_path / "run",
                "--config.distributed.initialization_timeout=5")
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode != 0
  # The configured 5 s, start-up and a busy machine's slack: far under the default 300 s.
  assert time.time() - start < 60, time.time() - start
  assert "coordinator" in out.lower() or "deadline" in out.lower() or "timed out" in out.lower()


def test_local_sh_passes_sigterm_on_and_exits_with_the_processes_status(tmp_path):
  """SIGTERM to the launcher reaches every process, and the launcher waits for them: its
  status is theirs (75: saved, rerun to resume), not its own interrupted wait's (143)."""
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\ntrap 'sleep 0.5; exit 75' TERM\n"
                  'touch "$READY_DIR/$$"\nwhile :; do sleep 0.05; done\n')
  fake.chmod(0o755)
  ready = tmp_path / "ready"
  ready.mkdir()
  proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "2", "--workdir=x"],
                          env=dict(os.environ, PYTHON=str(fake), PORT="1",
                                   READY_DIR=str(ready)))
  deadline = time.time() + 30
  while len(list(ready.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.05)
  assert len(list(ready.iterdir())) == 2
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 75


def test_launchers_are_recognised_and_slurm_tasks_get_their_gpus():
  from dsf3n_jax import distributed
  slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "16"}
  cluster_of = functools.partial(distributed.cluster_of, tpu_vm=False)
  assert cluster_of(slurm) == "slurm"
  # An salloc shell (no task of srun) and a one-task job are one process.
  assert cluster_of({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) is None
  assert cluster_of({**slurm, "SLURM_NTASKS": "1"}) is None
  assert cluster_of({"OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
  assert cluster_of({"OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert cluster_of({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert cluster_of({}) is None and cluster_of({}, tpu_vm=True) == "tpu"
  assert cluster_of({"JAX_COORDINATOR_ADDRESS": "h:1"}) is None  # an address, not a launcher
  ids = distributed.slurm_local_device_ids
  # --gpu-bind=single:1: each task sees its own GPU, numbered 0 (JAX would ask for SLURM_LOCALID).
  assert ids({**slurm, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3",
              "SLURM_NTASKS_PER_NODE": "8"}) == [0]
  # One task per node drives every GPU it sees (JAX would give it GPU 0 alone).
  assert ids({**slurm, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_NTASKS_PER_NODE": "1"}) == [
      0, 1, 2, 3]
  assert ids({**slurm, "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}) == [
      0, 1]
  # Several tasks that each see every GPU: JAX's own choice (GPU SLURM_LOCALID).
  assert ids({**slurm, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_NTASKS_PER_NODE": "4"}) is None
  # --gpus-per-task=2: each task's own two GPUs.
  assert ids({**slurm, "CUDA_VISIBLE_DEVICES": "4,5", "SLURM_NTASKS_PER_NODE": "4",
              "SLURM_GPUS_PER_TASK": "2"}) == [0, 1]
  assert ids({**slurm, "CUDA_VISIBLE_DEVICES": "4,5", "SLURM_NTASKS_PER_NODE": "4"}) == [0, 1]
  assert ids({**slurm, "CUDA_VISIBLE_DEVICES": "0", "JAX_LOCAL_DEVICE_IDS": "0"}) is None
  assert ids(slurm) is None  # no GPUs bound


def test_distributed_settings_are_checked_and_launchers_fill_the_rest():
  from dsf3n_jax import distributed
  calls = []

  def init(**kwargs):
    calls.append(kwargs)

  def start(environ=None, config=None, **flags):
    calls.clear()
    distributed.initialize(config or {}, environ=environ or {}, init=init, tpu_vm=False,
                           **flags)
    return calls[0] if calls else None

  assert start() is None  # a single process: nothing starts
  assert start(num_processes=1) is None
  got = start(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
              config={"heartbeat_timeout": 10})
  assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == (
      "10.0.0.1:1234", 2, 1)
  assert got["heartbeat_timeout_seconds"] == 10 and "local_device_ids" not in got
  assert start(config={"coordinator_address": "[::1]:99", "num_processes": 2,
                       "process_id": 0})["coordinator_address"] == "[::1]:99"
  # Under a launcher, JAX reads what is not given; SLURM tasks get their GPUs.
  got = start(environ={"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8",
                       "SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "5"})
  assert got["coordinator_address"] is None and got["local_device_ids"] == [0]
  errors = {
      "localhost": dict(coordinator_address="localhost", num_processes=2, process_id=0),
      "expected 0 to 1": dict(coordinator_address="h:1", num_processes=2, process_id=2),
      "--process_id (config.distributed.process_id): needed too": dict(
          coordinator_address="h:1", num_processes=2),
      "--coordinator_address (config.distributed.coordinator_address), --num_processes": dict(
          process_id=0),
  }
  for match, flags in errors.items():
    with pytest.raises(distributed.SettingsError, match=re.escape(match)):
      start(**flags)
  assert not calls
  # JAX_COORDINATOR_ADDRESS is an address (JAX reads nothing else from it): the rest is needed.
  with pytest.raises(distributed.SettingsError, match=r"--num_processes .*needed too"):
    start(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  got = start(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, num_processes=2,
              process_id=0)
  assert got["coordinator_address"] == "10.0.0.1:1234"


def test_the_mesh_is_in_process_order_whatever_order_the_devices_come_in():
  """Each process's devices hold one contiguous block of a batch (``process_rows``), also when
  the devices come in another order, as ``jax.make_mesh`` puts a TPU pod's (along its torus,
  interleaving the hosts)."""
  import jax

  from dsf3n_jax import input_pipeline
  from dsf3n_jax.mesh import make_mesh
  devices = jax.devices()
  shuffled = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
  mesh = make_mesh(shuffled)
  assert [d.id for d in mesh.devices] == sorted(d.id for d in devices)
  assert input_pipeline.process_rows(64, mesh=mesh) == (0, 64)
