"""The suite's XLA:CPU compile settings, shared by tests/conftest.py and the tests that start
processes (tests/test_train.py::xla_flags).

With most of XLA's optimisation off (``JAX_DISABLE_MOST_OPTIMIZATIONS``, tests/conftest.py),
the suite also compiles fusions with XLA:CPU's loop emitters instead of its MLIR fusion
emitters (``FAST_COMPILE``), which compile on a thread pool and set up a compiler for each of
its threads. Measured on a 2-core AMD EPYC, jax 0.10.2, with optimisation off: the tiny train
step on 8 host devices compiles in 3.0-3.5 s of CPU instead of 5.4-6.3 s (2.6-3.0 s of wall
time instead of 3.7-4.3 s); ``test_train.py``, ``test_loop.py``, ``test_failures.py``,
``test_models.py`` and ``test_retrieval.py`` without their slow tests (85 tests, ``-n 2``, cold
compilation cache) ran in 218 s of wall time and 386 s of user CPU instead of 268 s and 485 s.
Tanh and log1p round differently at -O0 with them; the suite's comparisons are between runs
with the same options. At XLA's default optimisation the loop emitters compile slower (the
tiny step: 13.4 s of CPU against 10.5 s) and round the step differently, so a test marked
``xla_optimized`` compiles with XLA's defaults (``XLA_DEFAULTS``), and so does a process a test
starts at the default.
"""

from __future__ import annotations

FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
# XLA's own values of those options (xla/debug_options_flags.cc).
XLA_DEFAULTS = {"xla_cpu_use_fusion_emitters": True}

TRUE_STRINGS = ("y", "yes", "t", "true", "on", "1")  # how JAX reads a boolean variable


def optimizations_off(environ) -> bool:
  """What ``JAX_DISABLE_MOST_OPTIMIZATIONS`` in ``environ`` says, read as JAX reads it."""
  return environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in TRUE_STRINGS


def fast_compile_flags() -> list[str]:
  """``FAST_COMPILE`` as ``XLA_FLAGS`` entries."""
  return [f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items()]


def is_fast_compile_flag(flag: str) -> bool:
  return flag.split("=", 1)[0].removeprefix("--") in FAST_COMPILE


def fast_compile_only(xla_flags: str) -> str:
  """The ``FAST_COMPILE`` entries of ``xla_flags`` alone: for a process that chooses its own
  devices and threads (the benchmarks) and compiles at the suite's optimisation."""
  return " ".join(f for f in xla_flags.split() if is_fast_compile_flag(f))
