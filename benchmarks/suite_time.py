"""Where the test suite's time goes: each test's duration beside the JAX tracing, lowering
and XLA compiling done in it, and the programs that cost the most to compile.

```
python -m benchmarks.suite_time                  # the README's suite: pytest -n 2 tests
python -m benchmarks.suite_time --workers 0 -- tests/test_train.py -k float64
```

Runs pytest with this module as a plugin (``-p benchmarks.suite_time``). In every
pytest process (each xdist worker) JAX's monitoring events are summed by the test
that is running (``/jax/core/compile/jaxpr_trace_duration``,
``jaxpr_to_mlir_module_duration``, ``backend_compile_duration``, which includes
loading from the persistent compilation cache, and the cache's hits and misses),
and by compiled program, and each test's CPU time: its own process's, and that of the
subprocesses it started and waited for (command-line runs, several processes), whose
compiles are not seen otherwise. Writes ``benchmarks/results/suite-<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = "DSF3N_SUITE_TIME_DIR"  # where each pytest process writes its sums
OUTSIDE = "(outside tests)"  # what ran between tests: collection, session fixtures' teardown
TIMES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
         "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
         "/jax/core/compile/backend_compile_duration": "compile_s"}  # cache loads included
CACHE = {"/jax/compilation_cache/cache_hits": "cache_hits",
         "/jax/compilation_cache/cache_misses": "cache_misses"}

# -- the plugin ---------------------------------------------------------------------------------

_tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_programs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
# {test: {program: compile seconds}}: which programs each test compiled (or loaded).
_test_programs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _current() -> str:
  """The running test's id (pytest sets ``PYTEST_CURRENT_TEST`` in the process running it)."""
  name = os.environ.get("PYTEST_CURRENT_TEST", "")
  return name.rsplit(" (", 1)[0] or OUTSIDE


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event not in TIMES:
    return
  _tests[_current()][TIMES[event]] += duration
  if TIMES[event] == "compile_s":
    _tests[_current()]["compiles"] += 1
    name = str(kwargs.get("fun_name", "?"))
    _test_programs[_current()][name] += duration
    program = _programs[name]
    program["compile_s"] += duration
    program["compiles"] += 1


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event in CACHE:
    _tests[_current()][CACHE[event]] += 1


def pytest_configure(config) -> None:
  del config
  if os.environ.get(ENV):
    from jax import monitoring  # pylint: disable=g-import-not-at-top

    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)


def _cpu_s(who: int) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """The test's duration (setup, call and teardown) and CPU time, in the process that runs
  it; ``children_cpu_s``: the CPU time of the subprocesses it waited for."""
  del nextitem
  t0 = time.perf_counter()
  cpu0 = _cpu_s(resource.RUSAGE_SELF)
  children0 = _cpu_s(resource.RUSAGE_CHILDREN)
  yield
  if os.environ.get(ENV):
    sums = _tests[item.nodeid]
    sums["duration_s"] += time.perf_counter() - t0
    sums["cpu_s"] += _cpu_s(resource.RUSAGE_SELF) - cpu0
    sums["children_cpu_s"] += _cpu_s(resource.RUSAGE_CHILDREN) - children0


def pytest_unconfigure(config) -> None:
  del config
  out = os.environ.get(ENV)
  if out and (_tests or _programs):
    path = pathlib.Path(out) / f"{os.getpid()}.json"
    path.write_text(json.dumps({"tests": _tests, "programs": _programs,
                                "test_programs": _test_programs}))


# -- the command ---------------------------------------------------------------------------------


def merge(paths: Sequence[pathlib.Path]) -> dict[str, dict[str, dict[str, float]]]:
  """The processes' sums added up: ``{"tests": {id: sums}, "programs": {name: sums},
  "test_programs": {id: {program: compile seconds}}}``."""
  merged = {"tests": collections.defaultdict(collections.Counter),
            "programs": collections.defaultdict(collections.Counter),
            "test_programs": collections.defaultdict(collections.Counter)}
  for path in paths:
    part = json.loads(path.read_text())
    for kind in merged:
      for key, sums in part[kind].items():
        merged[kind][key].update(sums)
  return {kind: {k: dict(v) for k, v in rows.items()} for kind, rows in merged.items()}


def summary(merged: dict[str, Any]) -> dict[str, float]:
  tests = [v for k, v in merged["tests"].items() if k != OUTSIDE]
  total = {key: sum(t.get(key, 0.0) for t in tests)
           for key in ("duration_s", "cpu_s", "children_cpu_s", "trace_s", "lower_s",
                       "compile_s", "compiles", "cache_hits", "cache_misses")}
  total["tests"] = sum(1 for t in tests if "duration_s" in t)
  return total


def markdown(doc: dict[str, Any], top: int = 25) -> str:
  t = doc["summary"]
  lines = [
      f"# Where the suite's time goes ({doc['machine']['cpu_model']}, {doc['started']})", "",
      f"`{doc['command']}`: exit {doc['returncode']}, {doc['wall_s']:.0f} s of wall time; "
      f"{int(t['tests'])} tests, {t['duration_s']:.0f} s of test time summed over the "
      f"workers; {t['cpu_s']:.0f} s of CPU time in the pytest processes and "
      f"{t['children_cpu_s']:.0f} s in the subprocesses tests started. In the pytest "
      f"processes: {t['compile_s']:.0f} s compiling "
      f"({int(t['compiles'])} compiles; the persistent cache: {int(t['cache_hits'])} loaded, "
      f"{int(t['cache_misses'])} misses), {t['trace_s']:.0f} s tracing, {t['lower_s']:.0f} s "
      f"lowering. Compiles in the subprocesses tests start are in their CPU time only.", "",
      "| test | duration (s) | CPU (s) | subprocess CPU (s) | compile (s) | trace + lower (s) "
      "| compiles | misses | costliest programs (compile s) |",
      "|---|---|---|---|---|---|---|---|---|"]
  tests = sorted(((k, v) for k, v in doc["tests"].items() if "duration_s" in v),
                 key=lambda kv: -kv[1]["duration_s"])
  for name, v in tests[:top]:
    programs = doc.get("test_programs", {}).get(name, {})
    costliest = ", ".join(f"`{p}` {s:.0f}" for p, s in sorted(
        programs.items(), key=lambda ps: -ps[1])[:3])
    lines.append(f"| `{name}` | {v['duration_s']:.1f} | {v.get('cpu_s', 0.0):.1f} | "
                 f"{v.get('children_cpu_s', 0.0):.1f} | {v.get('compile_s', 0.0):.1f} | "
                 f"{v.get('trace_s', 0.0) + v.get('lower_s', 0.0):.1f} | "
                 f"{int(v.get('compiles', 0))} | {int(v.get('cache_misses', 0))} | "
                 f"{costliest} |")
  lines += ["", "| program | compile (s) | compiles |", "|---|---|---|"]
  for name, v in sorted(doc["programs"].items(), key=lambda kv: -kv[1]["compile_s"])[:top]:
    lines.append(f"| `{name}` | {v['compile_s']:.1f} | {int(v['compiles'])} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  from benchmarks import accuracy, sysinfo  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m benchmarks.suite_time", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (0: none)")
  parser.add_argument("--out", default=None, help="folder for the results "
                      "(default benchmarks/results)")
  parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: "
                      "tests)")
  raw = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(raw)
  cmd = [sys.executable, "-m", "pytest", "-p", "benchmarks.suite_time", "-q",
         *(["-n", str(args.workers)] if args.workers else []), *(args.pytest_args or ["tests"])]
  machine = sysinfo.machine_info()  # before the run: its date is the start, its load the host's
  with tempfile.TemporaryDirectory() as sums:
    t0 = time.perf_counter()
    # The plugin is imported from this checkout whatever folder pytest runs from.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    returncode = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=pythonpath, **{ENV: sums})
                                ).returncode
    wall = time.perf_counter() - t0
    parts = sorted(pathlib.Path(sums).glob("*.json"))
    if not parts:
      print(f"suite_time: pytest (exit {returncode}) wrote no sums: was the plugin loaded?",
            file=sys.stderr)
      return 1
    merged = merge(parts)
  doc = {"benchmark": "suite_time",
         "command": " ".join(["python -m benchmarks.suite_time", *raw]),
         "pytest": " ".join(cmd[1:]), "returncode": returncode, "wall_s": wall,
         "started": machine["date"], "machine": machine, "versions": sysinfo.versions(),
         "summary": summary(merged), **merged}
  name = sysinfo.machine_slug(machine, sysinfo.accelerator_info())
  accuracy.publish(args.out, f"suite-{name}", doc, markdown(doc))
  return returncode


if __name__ == "__main__":
  sys.exit(main())
