"""Shared command-line plumbing: one-line errors and exit codes."""

from __future__ import annotations

import sys

from absl import flags
from absl import logging

USAGE_EXIT_CODE = 2


def fail(prog: str, message: str, code: int = USAGE_EXIT_CODE) -> None:
  """Prints ``prog: message`` as one line to stderr and exits with ``code``."""
  line = " ".join(str(message).split())
  print(f"{prog}: {line}", file=sys.stderr)
  sys.exit(code)


def flags_parser(prog: str):
  """An absl flags parser that reports bad flags in one line, exit code 2.

  absl's default prints the whole usage text and exits with 1; unknown
  ``--config.x`` keys and missing config files come through here too.
  """
  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
    except (flags.Error, KeyError, ValueError, FileNotFoundError, IOError) as e:
      fail(prog, f"{type(e).__name__ if not isinstance(e, flags.Error) else 'flag error'}: {e}")
    # Libraries (orbax, tfds) log every step at INFO; our progress is printed.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return rest
  return parse
