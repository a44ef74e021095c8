"""The command line's persistent compilation cache (dsf3n_jax.compilation_cache). That a rerun
loads the first run's train step is checked by test_train's command-line resume test."""

import os
import subprocess
import sys

from dsf3n_jax import cli, compilation_cache
from tests.test_train import REPO, xla_flags


def test_the_flag_then_jaxs_variable_then_the_default_and_off_on_several_cpu_processes():
  choose = compilation_cache.choose
  default = os.path.expanduser(compilation_cache.DEFAULT_DIR)
  assert choose(None, env=None, enabled=True, cpu_processes=1) == default
  assert choose(None, env="/e", enabled=True, cpu_processes=1) == "/e"
  assert choose("/f", env="/e", enabled=True, cpu_processes=1) == "/f"
  assert choose("gs://b/c", env=None, enabled=True, cpu_processes=1) == "gs://b/c"
  # '' and JAX_ENABLE_COMPILATION_CACHE=false turn it off.
  assert choose("", env="/e", enabled=True, cpu_processes=1) is None
  assert choose("/f", env="/e", enabled=False, cpu_processes=1) is None
  # Several CPU processes: only a directory named by the flag.
  assert choose(None, env="/e", enabled=True, cpu_processes=2) is None
  assert choose("/f", env=None, enabled=True, cpu_processes=2) == "/f"


def test_a_directory_it_cannot_create_is_one_usage_error_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  proc = subprocess.run(
      [sys.executable, "-m", "dsf3n_jax.main", "--config=configs/synthetic.py:runlocal,tiny",
       f"--workdir={tmp_path / 'run'}", f"--compilation_cache_dir={blocker / 'cache'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert f"--compilation_cache_dir={blocker / 'cache'}: expected a directory" in errors[0]
  assert not (tmp_path / "run").exists()
