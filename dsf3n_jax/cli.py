"""Command-line error reporting: ``error: ...`` lines on stderr instead of a traceback.

An exception that ends a command is printed as one ``error: <message>`` line
per line of its message (a ``config_check.ConfigError`` has one per problem).
The exit status is the exception's ``exit_status`` attribute if it has one (2:
a usage error, as ``UsageError`` and ``ConfigError``), else 1. ``--verbose`` on
the command line or ``DSF3N_VERBOSE=1`` in the environment prints the full
traceback first. An exception's ``details`` (text, e.g. how to get a missing file) follow
its error lines as they are, not as errors. ``KeyboardInterrupt`` and ``SystemExit`` pass
through.
``check_files`` and ``check_out_folder`` are the tools' shared checks of path flags.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

VERBOSE_ENV = "DSF3N_VERBOSE"
VERBOSE_FLAGS = ("--verbose", "--verbose=true", "--verbose=1")
USAGE_STATUS, RUNTIME_STATUS = 2, 1
# Exceptions whose message alone is cryptic (KeyError: 'x'): their type is named before it.
_NAMED = (LookupError, AttributeError, TypeError, NameError, AssertionError)


class UsageError(ValueError):
  """A bad command line: exit status 2.

  A flag's value (out of range, not parsed, a file or folder that is not there or not of the
  kind the flag takes, a split or dataset the source lacks), flags that do not go together or
  one that another needs, a config file, variant or field. Failures of the work itself (a
  data file's contents, a damaged checkpoint) are other exceptions: status 1. A
  ``ValueError``, as ``config_check.ConfigError`` is, so that Python callers of the
  functions behind the tools (``retrieval.embeddings_from_args``, ...) catch a bad argument
  as they did.
  """

  exit_status = USAGE_STATUS


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose error for an unknown flag suggests the tool's nearest
  flags (``--wokdir=x`` -> ``did you mean --workdir?``), as absl's flags do for ``main``.

  Unknown flags are reported first: a mistyped required flag is named as mistyped, not only
  as a required flag that is missing. Flags are not abbreviated (``allow_abbrev=False``):
  ``--query`` is unknown, not silently ``--query_embeddings``.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def parse_args(self, args=None, namespace=None):
    argv = list(sys.argv[1:] if args is None else args)
    known = [o for a in self._actions for o in a.option_strings]
    unknown = []
    for arg in argv:
      if arg in ("-h", "--help"):  # help is printed whatever else is given
        unknown = []
        break
      if arg == "--":
        break
      flag = arg.split("=", 1)[0]
      if flag.startswith("--") and " " not in arg and flag not in known and not (
          self.allow_abbrev and any(k.startswith(flag) for k in known)):
        unknown.append(arg)
    if unknown:
      self.error("unrecognized arguments: " + " ".join(unknown))
    return super().parse_args(argv, namespace)

  def error(self, message: str):
    unknown = message.partition("unrecognized arguments: ")[2]
    if unknown:
      known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
      hints = []
      for arg in unknown.split():
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.6) if flag.startswith(
            "--") else []
        if close:
          hints.append(f"{flag}: did you mean {' or '.join(close)}?")
      if hints:
        message += " (" + "; ".join(hints) + ")"
    super().error(message)


def check_files(*flags: tuple[str, Any]) -> None:
  """A ``UsageError`` for the first ``(flag, path)`` whose path (when given) is not a file:
  ``--data=x.npz: no such file``."""
  for flag, path in flags:
    if path and not pathlib.Path(path).is_file():
      found = "a folder, not a file" if pathlib.Path(path).is_dir() else "no such file"
      raise UsageError(f"{flag}={path}: {found}")


def check_at_least_one(args, *flags: str) -> None:
  """A ``UsageError`` for the first of ``flags`` (attributes of parsed ``args``) given a value
  below 1: ``--batch_size=0: expected an int >= 1``; a flag not given (None) passes."""
  for flag in flags:
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise UsageError(f"--{flag}={value}: expected an int >= 1")


def check_out_folder(flag: str, path: str | os.PathLike) -> pathlib.Path:
  """``path`` (the value of ``flag``) as a folder that is there or can be made there, checked
  before any work: a ``UsageError`` if it or a folder above it is a file, or the nearest
  folder there is not writable."""
  out = pathlib.Path(path)
  there = next(p for p in (out, *out.parents, pathlib.Path(".")) if p.exists())
  expected = f"{flag}={path}: expected a folder (new or existing) to write in"
  if not there.is_dir():
    raise UsageError(f"{expected}; found a file" + ("" if there == out else f" ({there})"))
  if not os.access(there, os.W_OK | os.X_OK):
    raise UsageError(f"{expected}; found {there}, which this process cannot write")
  return out


def first_line(e: BaseException) -> str:
  """``Type: first line of the message`` (orbax/tensorstore messages run to pages)."""
  text = str(e).strip() or type(e).__name__
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}"


def verbose_requested(argv: Sequence[str]) -> bool:
  """``--verbose`` in ``argv`` or ``DSF3N_VERBOSE`` set to 1 / true / yes / on."""
  env = os.environ.get(VERBOSE_ENV, "").strip().lower()
  return env in ("1", "true", "yes", "on") or any(a in VERBOSE_FLAGS for a in argv)


def error_lines(exc: BaseException) -> list[str]:
  """The message of ``exc`` as lines (a traceback folded into it: its last line only)."""
  text = str(exc).strip()
  if "Traceback (most recent call last)" in text:
    text = re.sub(r"^\w+(Error|Exception): ", "", text.splitlines()[-1].strip())
  lines = [line.rstrip() for line in text.splitlines() if line.strip()]
  if not lines:
    return [type(exc).__name__]
  if isinstance(exc, _NAMED):
    lines[0] = f"{type(exc).__name__}: {lines[0]}"
  notes = [n.strip() for n in getattr(exc, "__notes__", ()) if n.strip()]
  if notes:  # e.g. the last intact checkpoint of a failed run: on the same line
    lines[-1] += "; " + "; ".join(notes)
  return lines


def report(exc: BaseException, *, verbose: bool = False) -> int:
  """Prints ``exc`` to stderr (traceback first if ``verbose``; its ``details`` after the error
  lines, unprefixed); returns the exit status."""
  if verbose:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
  for line in error_lines(exc):
    print(f"error: {line}", file=sys.stderr)
  details = getattr(exc, "details", None)
  if isinstance(details, str) and details.strip():
    print(details.rstrip(), file=sys.stderr)
  sys.stderr.flush()
  return int(getattr(exc, "exit_status", RUNTIME_STATUS))


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
  """``main(argv)`` (``--verbose`` taken out of ``argv``); an exception: its exit status.

  Args:
    main: an argparse-style entry point taking the arguments without the program name.
    argv: default ``sys.argv[1:]``.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = verbose_requested(argv)
  if not verbose:  # libraries' notices (orbax opening a run read-only) are not the output
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.ERROR)
  try:
    return main([a for a in argv if a not in VERBOSE_FLAGS])
  except Exception as e:  # noqa: BLE001 - reported as error lines; KeyboardInterrupt passes
    return report(e, verbose=verbose)
