"""Command line: ``python -m dsf3n_jax.main --config=configs/synthetic.py --workdir=DIR``.

Every config field can be overridden: ``--config.optim.lr=3e-4``. Multi-host
flags (``--coordinator_address``, ``--num_processes``, ``--process_id``)
override ``config.distributed``.

Errors are ``error: ...`` lines on stderr (``dsf3n_jax.cli``): exit status 2 for a
bad command line or config (a flag, config file, variant, unknown field or bad
value: the config is checked before anything compiles), 1 for a failure of the
run; ``--verbose`` or ``DSF3N_VERBOSE=1`` prints the traceback too.
"""

from __future__ import annotations

import os
import sys

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
  return [config_check.unknown_field_message(p, known) for p in paths if p not in known]


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


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before jax is used: quieter logs and (multi-host) the distributed runtime.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from dsf3n_jax import config_check, distributed, train

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress goes to the console; libraries stay quiet
  config = FLAGS.config
  config_check.check_unknown_fields(config, train.default_config())  # fields set in the file
  if str(config.model.dtype) == "float64":  # float64 end to end: parameters, optimiser, loss
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_enable_x64", True)
  distributed.initialize(config.distributed, coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  results = train.train_and_evaluate(config, FLAGS.workdir)
  if distributed.is_main_process():
    print(train.format_results(results))
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")
  logging.flush()


def run():
  """Console entry point: an error is ``error: ...`` lines and exit status 2 or 1."""
  sys.path.insert(0, os.getcwd())  # so configs can `from configs import default`
  try:
    app.run(main, flags_parser=_parse_flags)
  except Exception as e:  # noqa: BLE001 - reported in one line each; KeyboardInterrupt passes
    sys.exit(cli.report(e, verbose=cli.verbose_requested(sys.argv[1:])))


if __name__ == "__main__":
  run()
