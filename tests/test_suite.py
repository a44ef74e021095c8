"""The suite's own setup: the tests that share an expensive module fixture run on one worker;
most of XLA's optimisation is off except in the tests marked ``xla_optimized``."""

import os
import re
import subprocess
import sys

import jax
import pytest
from jax._src import compiler as jax_compiler

from tests import suite_xla
from tests.test_train import xla_flags


def test_the_tests_of_one_xdist_group_run_on_one_worker(tmp_path):
  # The suite runs with --dist loadgroup (pyproject's addopts). A pytest in which xdist cannot
  # name a test's group (pytest 9.2 with pytest-xdist 3.8) spreads the group over the workers
  # again, and each worker builds the fixture they share.
  (tmp_path / "test_grouped.py").write_text(
      "import pytest\n"
      + "".join(f"@pytest.mark.xdist_group('shared')\ndef test_in_{i}():\n  pass\n"
                for i in range(4))
      + "".join(f"def test_out_{i}():\n  pass\n" for i in range(4)))
  proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
                         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:]
  ran = re.findall(r"\[(gw\d)\].* PASSED \S*::(test_in_\d)(@shared)?", proc.stdout)
  assert len(ran) == 4 and all(group for _, _, group in ran), proc.stdout[-3000:]
  assert len({worker for worker, _, _ in ran}) == 1, proc.stdout[-3000:]


def _overrides(**own):
  """The compile options JAX would give a program with ``own`` compiler options."""
  return dict(jax_compiler.get_compile_options(1, 1, env_options_overrides=own or None)
              .env_option_overrides)


def test_an_unmarked_test_compiles_as_the_environment_says():
  # JAX_DISABLE_MOST_OPTIMIZATIONS: tests/conftest.py sets it when it is unset.
  off = suite_xla.optimizations_off(os.environ)
  assert jax.config.values["jax_disable_most_optimizations"] is off
  assert _overrides() == {}  # XLA_FLAGS alone: with optimisation off, the fast codegen
  assert _overrides(xla_cpu_use_fusion_emitters=True) == {"xla_cpu_use_fusion_emitters": True}


def test_the_fast_codegen_flags_go_with_optimisation_off_and_not_to_an_optimized_process():
  flags = suite_xla.fast_compile_flags()
  assert flags == ["--xla_cpu_use_fusion_emitters=false",
                   "--xla_cpu_parallel_codegen_split_count=1"]
  assert suite_xla.optimizations_off({"JAX_DISABLE_MOST_OPTIMIZATIONS": "True"})
  assert not suite_xla.optimizations_off({"JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})
  assert not suite_xla.optimizations_off({})
  if suite_xla.optimizations_off(os.environ) and suite_xla.xla_accepts(flags):
    assert all(f in xla_flags(2).split() for f in flags), xla_flags(2)
  assert not suite_xla.xla_accepts(["--xla_cpu_no_such_option=true"])
  assert suite_xla.defaults_undoing(" ".join(["--xla_cpu_multi_thread_eigen=false", *flags])
                                    ) == suite_xla.XLA_DEFAULTS
  assert suite_xla.defaults_undoing("--xla_force_host_platform_device_count=8") == {}
  optimized = xla_flags(1, optimized=True).split()
  assert "--xla_force_host_platform_device_count=1" in optimized
  assert not any(suite_xla.is_fast_compile_flag(f) for f in optimized), optimized


@pytest.mark.xla_optimized
def test_a_test_marked_xla_optimized_compiles_at_xlas_default():
  assert jax.config.values["jax_disable_most_optimizations"] is False
  # XLA's own codegen options, whatever XLA_FLAGS say; a program's own options stay.
  undone = suite_xla.defaults_undoing(os.environ["XLA_FLAGS"])
  assert _overrides() == undone
  assert _overrides(xla_cpu_use_fusion_emitters=False, xla_backend_optimization_level=1) == {
      **undone, "xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
