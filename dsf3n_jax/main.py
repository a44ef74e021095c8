"""Command line: ``python -m dsf3n_jax.main --config=configs/synthetic.py --workdir=DIR``.

Every config field can be overridden: ``--config.optim.lr=3e-4``. Multi-host
flags (``--coordinator_address``, ``--num_processes``, ``--process_id``)
override ``config.distributed``.

Errors are ``error: ...`` lines on stderr (``dsf3n_jax.cli``): exit status 2 for a
bad command line or config (a flag, config file, variant, unknown field or bad
value: the config is checked before anything compiles), 1 for a failure of the
run; ``--verbose`` or ``DSF3N_VERBOSE=1`` prints the traceback too.

``--config`` is a path, absolute or relative to the current directory, from any
directory: the source tree's root (the folder holding ``configs/``) goes first on
``sys.path``, so a config file anywhere, ours or a user's own, can build on ours
with ``from configs import default``; the config file's own folder goes last, so
it can import its neighbours too (``configs/__init__.py`` says more).
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from dsf3n_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache: a "
                    "rerun loads its compiled programs instead of compiling them ('': off; "
                    "default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/dsf3n_jax/jax; "
                    "dsf3n_jax.compilation_cache says more).")
flags.DEFINE_bool("verbose", False, f"On an error, print the traceback too (or set "
                  f"{cli.VERBOSE_ENV}=1).")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_value(argv, name):
  """The value of ``--name=V`` or ``--name V`` in ``argv`` (None if absent)."""
  for i, arg in enumerate(argv):
    key, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and key == name:
      return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _unknown_overrides(argv) -> list[str]:
  """A message per ``--config.<path>`` naming no field of the config file's config."""
  from dsf3n_jax import config_check  # pylint: disable=g-import-not-at-top
  spec = _flag_value(argv, "config")
  try:
    known = config_check.key_paths(ConfigFileFlagParser("config", lock_config=False).parse(spec))
  except Exception:  # noqa: BLE001 - the config itself failed: absl's message says why
    return []
  paths = [a.lstrip("-").partition("=")[0].removeprefix("config.") for a in argv
           if a.startswith("-") and a.lstrip("-").startswith("config.")]
  return [_generator_option_message(p) or config_check.unknown_field_message(p, known)
          for p in paths if p not in known]


def _generator_option_message(path: str) -> str | None:
  """For ``data.synthetic.<an option of generate_synthetic>`` the config file does not set."""
  from dsf3n_jax.datasets import synthetic  # pylint: disable=g-import-not-at-top
  parent, _, name = path.rpartition(".")
  if parent != "data.synthetic" or name not in synthetic.OPTIONS:
    return None
  return (f"config.{path}: an option of the synthetic generator that this config file does "
          f"not set, so no flag (a flag overrides a field the file has); set it in a config "
          f"file of yours: config.data.synthetic.{name} = ... (default "
          f"{synthetic.OPTIONS[name]!r}; docs/data.md)")


def _parse_flags(argv):
  """absl's flag parsing; a bad flag, config file or field is a ``cli.UsageError``."""
  try:
    rest = FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags.Error, or an unknown field's AttributeError
    unknown = _unknown_overrides(argv) if _flag_value(argv, "config") else []
    raise cli.UsageError("\n".join(unknown) or cli.error_lines(e)[-1]) from e
  try:
    FLAGS.config.keys()  # ml_collections reports a config file it could not load only now
  except OSError as e:
    raise cli.UsageError(f"--config: {cli.error_lines(e.__cause__ or e)[-1].strip()}") from e
  return rest


_SEEN_ERRORS: set[tuple[str, str]] = set()


def _error_in_one_line(exc_type, exc_value, _tb, *, where: str = "") -> None:
  """A library's stray exception: one warning line, each distinct one once."""
  if exc_type is SystemExit:
    return
  first = str(exc_value).strip().split("\n", 1)[0][:200]
  if (exc_type.__name__, first) not in _SEEN_ERRORS:
    _SEEN_ERRORS.add((exc_type.__name__, first))
    print(f"warning: {where}{exc_type.__name__}: {first}", file=sys.stderr)


def _thread_error_in_one_line(args) -> None:
  """An exception ending a library's thread (e.g. an I/O loop of a failed save)."""
  name = args.thread.name if args.thread is not None else "?"
  _error_in_one_line(args.exc_type, args.exc_value, None, where=f"thread {name}: ")


def _unraisable_in_one_line(args) -> None:
  """An exception native code could not raise (tensorstore's callbacks on a closed loop)."""
  _error_in_one_line(args.exc_type, args.exc_value, None)


def _without_traceback(record) -> bool:
  record.exc_info, record.exc_text = None, None
  record.msg = str(record.msg).split("\n", 1)[0]
  return True


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
  from dsf3n_jax import paths  # pylint: disable=g-import-not-at-top (after the signal recorder)
  try:  # an empty --workdir (an unset variable) is a usage error, named by its flag
    paths.resolve(FLAGS.workdir)
  except ValueError as e:
    raise cli.UsageError(f"--{e}") from e
  # Before jax is used: quieter logs and (multi-host) the distributed runtime.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from dsf3n_jax import config_check, distributed, train

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress goes to the console; libraries stay quiet
  if not cli.verbose_requested(sys.argv[1:]):
    # A library's error log is one line: the traceback of a failed background save is
    # printed with --verbose; the run's own error line names the cause.
    logging.get_absl_handler().addFilter(_without_traceback)
    threading.excepthook = _thread_error_in_one_line
    sys.excepthook = _error_in_one_line
    sys.unraisablehook = _unraisable_in_one_line  # what native code (tensorstore callbacks) prints
  config = FLAGS.config
  config_check.check_unknown_fields(config, train.default_config())  # fields set in the file
  if str(config.model.dtype) == "float64":  # float64 end to end: parameters, optimiser, loss
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_enable_x64", True)
  try:
    distributed.initialize(config.distributed, coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  except distributed.SettingsError as e:
    raise cli.UsageError(str(e)) from e
  use_compilation_cache()
  results = train.train_and_evaluate(config, FLAGS.workdir)
  if distributed.is_main_process():
    print(train.format_results(results))
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")
  logging.flush()


def use_compilation_cache() -> str | None:
  """``compilation_cache.setup`` with ``--compilation_cache_dir``; a directory it cannot
  create is a usage error."""
  from dsf3n_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  try:
    return compilation_cache.setup(FLAGS.compilation_cache_dir)
  except ValueError as e:
    raise cli.UsageError(str(e)) from e


def source_root() -> pathlib.Path | None:
  """The folder holding ``configs/`` beside the ``dsf3n_jax`` source tree (None if absent).

  Found as ``train.default_config`` finds ``configs/default.py``.
  """
  root = pathlib.Path(__file__).resolve().parents[1]
  return root if (root / "configs" / "default.py").is_file() else None


def config_search_path(argv) -> list[str]:
  """Puts on ``sys.path`` what a ``--config`` file in ``argv`` imports; returns ``sys.path``.

  First: the source root (``configs`` then means our configs, from any working
  directory), then the working directory (as ``python -m`` has it). Last: the
  config file's folder, for a config that imports a module beside it.
  """
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  root = source_root()
  if root is not None and sys.path[:1] != [str(root)]:
    sys.path.insert(0, str(root))  # first, even if it is on the path already (PYTHONPATH)
  spec = _flag_value(argv, "config")
  if spec:
    path = spec.split(":", 1)[0]  # ml_collections: what follows the first ':' is the variant
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder) and folder not in sys.path:
      sys.path.append(folder)
  return sys.path


def run(entry=None):
  """Console entry point of ``main`` (or ``entry``, a command with these flags and more:
  ``dsf3n_jax.sweep``): an error is ``error: ...`` lines and exit status 2 or 1; a run
  stopped by SIGTERM / SIGINT or a preemption notice, with its checkpoint saved, is one
  ``preempted: ...`` line and exit status 75 (``training.preemption.EXIT_STATUS``)."""
  config_search_path(sys.argv[1:])  # so any config can `from configs import default`
  if entry is None:  # a signal while the run starts stops it before its first step (exit 75)
    from dsf3n_jax.training import preemption  # pylint: disable=g-import-not-at-top
    preemption.watch_from_start()
  try:
    app.run(entry or main, flags_parser=_parse_flags)
  except Exception as e:  # noqa: BLE001 - reported in one line each; KeyboardInterrupt passes
    from dsf3n_jax.training import preemption  # pylint: disable=g-import-not-at-top
    if isinstance(e, preemption.Preempted):  # a checkpoint was saved: the status to requeue on
      print(f"preempted: {e}", file=sys.stderr)
      status = e.exit_status
    else:
      status = cli.report(e, verbose=cli.verbose_requested(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    # The run has closed what it could (train.train_and_evaluate); threads a failed save or
    # writer left behind must not keep the process alive (on a pod, the allocation).
    os._exit(status)

if __name__ == "__main__":
  run()
