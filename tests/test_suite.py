"""The suite's own setup: the tests that share an expensive module fixture run on one worker;
most of XLA's optimisation is off except in the tests marked ``xla_optimized``."""

import os
import re
import subprocess
import sys

import jax
import pytest


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


def _off_by_default() -> bool:
  """What JAX_DISABLE_MOST_OPTIMIZATIONS says (tests/conftest.py sets it when it is unset)."""
  return os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("y", "yes", "t", "true", "on",
                                                                  "1")


def test_an_unmarked_test_compiles_as_the_environment_says():
  assert jax.config.values["jax_disable_most_optimizations"] is _off_by_default()


@pytest.mark.xla_optimized
def test_a_test_marked_xla_optimized_compiles_at_xlas_default():
  assert jax.config.values["jax_disable_most_optimizations"] is False
