"""The suite's XLA:CPU compile settings, shared by tests/conftest.py and the tests that start
processes (tests/test_train.py::xla_flags).

With most of XLA's optimisation off (``JAX_DISABLE_MOST_OPTIMIZATIONS``, tests/conftest.py),
the suite also compiles fusions with XLA:CPU's loop emitters instead of its MLIR fusion
emitters, which compile on a thread pool and set up a compiler for each of its threads, and
each program's LLVM module in one piece (``FAST_COMPILE``). Measured on a 2-core AMD EPYC,
jax 0.10.2, with optimisation off: the tiny train step on 8 host devices compiles in 3.0-4.0 s
of CPU instead of 5.3-6.3 s, with the same bits after 3 steps; ``test_train.py``,
``test_loop.py``, ``test_failures.py``, ``test_models.py`` and ``test_retrieval.py`` without
their slow tests (85 tests, ``-n 2``, cold compilation cache) ran in 209 s of wall time and
368 s of user CPU instead of 268 s and 485 s. The module in one piece matters for the bits:
with the loop emitters alone, the seeds trained together (``test_seeds.py``) drift 1e-4 from
the same seeds trained one by one after two epochs (the two agree to 1e-5 with XLA's
emitters, and again with both options). Tanh and log1p still round differently at -O0; the
suite's comparisons are between runs with the same options. At XLA's default optimisation
the loop emitters compile slower (the tiny step: 13 s of CPU against 10.5 s) and round the
step differently, so a test marked ``xla_optimized`` compiles with XLA's defaults
(``XLA_DEFAULTS``), and so does a process a test starts at the default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_cpu_parallel_codegen_split_count": 1}
# XLA's own values of those options (xla/debug_options_flags.cc).
XLA_DEFAULTS = {"xla_cpu_use_fusion_emitters": True, "xla_cpu_parallel_codegen_split_count": 32}

TRUE_STRINGS = ("y", "yes", "t", "true", "on", "1")  # how JAX reads a boolean variable


def optimizations_off(environ) -> bool:
  """What ``JAX_DISABLE_MOST_OPTIMIZATIONS`` in ``environ`` says, read as JAX reads it."""
  return environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in TRUE_STRINGS


def fast_compile_flags() -> list[str]:
  """``FAST_COMPILE`` as ``XLA_FLAGS`` entries."""
  return [f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items()]


def _option(flag: str) -> str:
  """The option an ``XLA_FLAGS`` entry sets: ``--name=value`` -> ``name``."""
  return flag.split("=", 1)[0].removeprefix("--")


def is_fast_compile_flag(flag: str) -> bool:
  return _option(flag) in FAST_COMPILE


def xla_accepts(flags: Sequence[str]) -> bool:
  """Whether this jaxlib's XLA takes ``flags`` in ``XLA_FLAGS``. XLA ends the process on a flag
  it does not know (a newer one may drop an option), so a child process tries (about 2 s)."""
  probe = "from jax._src.lib import xla_client; xla_client.CompileOptions()"
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                        timeout=300).returncode == 0


def defaults_undoing(xla_flags: str) -> dict[str, object]:
  """XLA's defaults of the ``FAST_COMPILE`` options that ``xla_flags`` sets."""
  return {_option(f): XLA_DEFAULTS[_option(f)] for f in xla_flags.split()
          if is_fast_compile_flag(f)}


def fast_compile_only(xla_flags: str) -> str:
  """The ``FAST_COMPILE`` entries of ``xla_flags`` alone: for a process that chooses its own
  devices and threads (the benchmarks) and compiles at the suite's optimisation."""
  return " ".join(f for f in xla_flags.split() if is_fast_compile_flag(f))
