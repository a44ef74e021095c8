"""Test setup: eight host CPU devices, so data-parallel code runs here."""

import copy
import os
import pathlib
import shutil

from tests import suite_xla

# Must happen before jax is imported anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the whole suite (workers and the subprocesses they
# start inherit it): the many small runs of the same tiny model compile once. Results do not
# depend on it (the cache stores the same executables).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(
    pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"))
# Every executable is cached, the small ones too (a run jits dozens of them: loading beats
# compiling, about a second a run).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Most of XLA's optimisation off (LLVM at -O0; JAX's switch for programs that run for less
# time than they take to compile): the suite's tiny models compile a train step in about 3.5 s
# instead of 6 on a 2-core host, and the suite ran in 15.5-18 min instead of 22 there. The
# subprocesses inherit it. The tests that compare float32 rounding with PyTorch
# (``pytest.mark.xla_optimized``) and the 20-epoch real-data run ("0" in its subprocess's
# environment) compile at XLA's default; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the whole suite
# at it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Eight host CPU devices. One thread per XLA CPU computation: the two xdist workers share two
# cores, and Eigen's thread per core in each of them only competes (measured: test_train.py and
# test_failures.py without their slow tests, warm cache, 2 workers: 126 s against 148-151 s).
# With optimisation off, XLA:CPU's faster-compiling codegen too, where this jaxlib has it
# (tests/suite_xla.py: 20-25 % less time and CPU on the tests measured there). The xdist
# workers and the subprocesses the tests start keep these (``xla_flags``).
if "XLA_FLAGS" not in os.environ:
  _fast = suite_xla.fast_compile_flags()
  if not (suite_xla.optimizations_off(os.environ) and suite_xla.xla_accepts(_fast)):
    _fast = []
  os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=8",
                                      "--xla_cpu_multi_thread_eigen=false", *_fast])

import jax  # noqa: E402
import pytest  # noqa: E402
from jax._src import compiler as jax_compiler  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _with_xla_default_codegen(get_compile_options):
  """``jax._src.compiler.get_compile_options`` that undoes ``XLA_FLAGS``' ``FAST_COMPILE``
  options (``suite_xla.XLA_DEFAULTS``) where the program's own compiler options leave them."""
  defaults = suite_xla.defaults_undoing(os.environ.get("XLA_FLAGS", ""))

  def get(*args, **kwargs):
    options = get_compile_options(*args, **kwargs)
    own = dict(options.env_option_overrides)
    options.env_option_overrides = [*own.items(),
                                    *((k, v) for k, v in defaults.items() if k not in own)]
    return options

  return get


@pytest.fixture(autouse=True)
def _xla_optimization(request, monkeypatch):
  """XLA's default optimisation for a test marked ``xla_optimized`` (see the top of this file)
  while it runs: what it jits compiles at the default, with XLA's own codegen options (the
  persistent cache keys the two apart); a function this worker jitted and compiled before
  keeps its executable, but the programs runs share (``state.forget_programs``) are
  forgotten before and after. JAX has no public setting for compile options of every
  program, so this wraps its private ``get_compile_options`` (jax 0.10)."""
  if request.node.get_closest_marker("xla_optimized") is None:
    yield
    return
  from dsf3n_jax.training import state as state_lib
  monkeypatch.setattr(jax_compiler, "get_compile_options",
                      _with_xla_default_codegen(jax_compiler.get_compile_options))
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  state_lib.forget_programs()
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    state_lib.forget_programs()


@pytest.fixture(scope="session")
def _plain_run_trained(tmp_path_factory):
  from dsf3n_jax import train
  from tests.test_train import tiny_config
  workdir = tmp_path_factory.mktemp("plain") / "run"
  return train.train_and_evaluate(tiny_config(num_epochs=1), str(workdir)), workdir


@pytest.fixture
def plain_run(_plain_run_trained):
  """``copy(workdir) -> results``: ``workdir`` made a copy of the workdir of
  ``train_and_evaluate(tiny_config(num_epochs=1))``, trained once per process (the tests that
  use it share an xdist group, tests/test_loop.py's ``SHARES_PLAIN_RUN``); each test gets its
  own copy of the folder and of the results."""
  results, trained = _plain_run_trained

  def copy_to(workdir):
    shutil.copytree(trained, workdir)
    return copy.deepcopy(results)

  return copy_to


@pytest.fixture(scope="session")
def fsdd_path():
  """The real audio-visual digits file; skips when it is absent."""
  path = SHARED_DATA / "fsdd_digits.npz"
  if not path.exists():
    pytest.skip(f"real data file {path} is absent (see shared/data/README.md)")
  return path


def write_bad_npz_files(folder) -> dict[str, pathlib.Path]:
  """Files named ``<kind>.npz`` that are not ``.npz`` archives of arrays, by kind."""
  import pickle
  import zipfile

  import h5py
  import numpy as np

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = {}

  def path(kind):
    paths[kind] = folder / f"{kind}.npz"
    return paths[kind]

  with open(path("pickle"), "wb") as f:  # what torch.save / pickle.dump of a dict write
    pickle.dump({"emb_visual": np.ones((2, 2)), "params/w": np.ones(2)}, f)
  # A real .npz whose one member is an object array: np.load wants allow_pickle=True for it.
  np.savez(path("object_array"), **{k: np.array([{"x": 1}, None], dtype=object) for k in (
      "emb_visual", "emb_audio", "labels", "params/w", "visual_test", "audio_test", "lab_test",
      "visual_train", "audio_train", "lab_train")})
  path("random_bytes").write_bytes(np.random.default_rng(0).bytes(4096))
  with h5py.File(path("hdf5"), "w") as f:  # an HDF5 file under an .npz name
    f["visual_test"] = np.ones((2, 2))
  with open(path("npy"), "wb") as f:  # np.save, not np.savez
    np.save(f, np.ones(3))
  with zipfile.ZipFile(path("zip_of_other_things"), "w") as z:  # e.g. a torch .pth
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
  path("empty").write_bytes(b"")
  return paths


@pytest.fixture()
def bad_npz_files(tmp_path):
  """``{kind: path}`` of files named .npz that are not .npz archives of arrays."""
  return write_bad_npz_files(tmp_path / "bad")


def _assert_refused_npz(message: str, path) -> None:
  assert "\n" not in message, message
  assert str(path) in message, message
  assert "expected" in message and ".npz of arrays" in message, message
  assert "allow_pickle" not in message, message


@pytest.fixture()
def assert_refused_npz():
  """``check(message, path)``: one line naming the file and the .npz of arrays expected,
  and not numpy's advice to set allow_pickle."""
  return _assert_refused_npz


# Longest first: the tests marked slow (end-to-end runs, several minutes each) start before
# the quick ones, so that on two workers no single long test runs alone at the end. (Under
# --dist loadgroup xdist hands out the xdist_group groups first, then the rest in this order.)
def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                               "learns_real" not in item.nodeid))
