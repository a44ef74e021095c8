"""``tfds build`` for this package's datasets, without TensorFlow.

The stock ``tfds`` command imports TensorFlow for unrelated sub-commands; this
runs its ``build`` command with ``--imports=dsf3n_jax.datasets.builders`` and
``--file_format=array_record`` added. Same flags as ``tfds build``::

  python -m dsf3n_jax.datasets.build vegas --manual_dir=DIR [--data_dir=DIR]
"""

from __future__ import annotations

import os
import sys

from dsf3n_jax import cli
from dsf3n_jax.datasets.validation import DataValidationError

# Folder flags whose ``~`` is the home folder (the shell leaves ``--flag=~/x`` as it is).
_FOLDER_FLAGS = ("--data_dir=", "--manual_dir=", "--download_dir=", "--extract_dir=")


def _expanded(arg: str) -> str:
  for flag in _FOLDER_FLAGS:
    if arg.startswith(flag):
      return flag + os.path.expanduser(arg[len(flag):])
  return arg


def _execute(args) -> None:
  """``args.execute()``; bad data is the one error line every command line gives (exit 1),
  not a traceback."""
  try:
    args.execute()
  except DataValidationError as e:
    sys.exit(cli.report(e))


def main(argv: list[str] | None = None) -> None:
  """Parses ``tfds build`` flags and builds.

  Args:
    argv: command line including the program name (default ``sys.argv``).
  """
  from absl import app
  from tensorflow_datasets.scripts.cli import build, cli_utils

  argv = [_expanded(a) for a in (sys.argv if argv is None else argv)]
  if not any(a.startswith(("--imports", "-i", "--module_import")) for a in argv[1:]):
    argv.append("--imports=dsf3n_jax.datasets.builders")
  if not any(a.startswith("--file_format") for a in argv[1:]):
    argv.append("--file_format=array_record")
  parse = cli_utils.make_flags_parser(build.Args, description="Build dsf3n_jax datasets.")
  app.run(_execute, argv=argv, flags_parser=parse)


if __name__ == "__main__":
  main()
