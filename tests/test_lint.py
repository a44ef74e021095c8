"""The sources pass ruff with the rules of pyproject.toml ([tool.ruff])."""

import subprocess
import sys

from tests.test_train import REPO


def test_the_sources_pass_ruff():
  paths = ["dsf3n_jax", "benchmarks", "configs", "launch", "tests"]
  done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *paths], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout + done.stderr
