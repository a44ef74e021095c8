"""Test setup: eight host CPU devices, so data-parallel code runs here."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def fsdd_path():
  """The real audio-visual digits file; skips when it is absent."""
  path = SHARED_DATA / "fsdd_digits.npz"
  if not path.exists():
    pytest.skip(f"real data file {path} is absent (see shared/data/README.md)")
  return path
