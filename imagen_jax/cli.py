"""Shared command-line plumbing: one-line errors and exit codes."""

from __future__ import annotations

import sys

from absl import flags
from absl import logging

from imagen_jax import config_defaults
from imagen_jax import xla_flags

# Exit codes of every imagen-* command, defined here once.
USAGE_EXIT_CODE = 2         # bad flags, config or input (one line on stderr)
NONFINITE_EXIT_CODE = 3     # training: too many non-finite steps in a row
PREEMPTED_EXIT_CODE = 75    # EX_TEMPFAIL: state saved on SIGTERM; run again


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
    except (AttributeError, KeyError) as e:
      # ml_collections: an override names a field the config does not have.
      name = str(e).strip("\"'")
      bad = [a for a in argv if a.startswith("--config.") and name in a]
      fail(prog, f"unknown config field {bad[0].split('=')[0] if bad else name}; "
           "see the config file (and imagen_jax/config_defaults.py) for fields.")
    except (flags.Error, ValueError, FileNotFoundError, IOError) as e:
      fail(prog, f"{e}")
    setup_logging_and_cache(flags.FLAGS["verbosity"].present)
    return rest
  return parse


def setup_logging_and_cache(verbosity_given: bool = False) -> None:
  """Quiet library logging (unless asked) and the persistent XLA cache."""
  # Libraries (orbax, tfds) log every step at INFO; our progress is printed.
  if not verbosity_given:
    logging.set_verbosity(logging.WARNING)
  xla_flags.enable_compilation_cache()


def config_value(prog: str, holder):
  """The parsed, validated config of a config_flags holder.

  A file that fails to load (missing, syntax error) or a value the schema
  refuses (``config_defaults.validate``) becomes one line and exit code 2,
  before any data is read or anything compiled.
  """
  config = _load_config(prog, holder)
  try:
    config_defaults.validate(config)
  except config_defaults.ConfigError as e:
    fail(prog, str(e))
  return config


def check_stage_model(prog: str, config, where: str = "config") -> None:
  """Fails with one line (exit 2) unless the stage's U-Net builds.

  Args:
    prog: the command's name, for the message.
    config: a validated stage config (``config_value``).
    where: the config's path, for the message (e.g. "config.base").
  """
  from imagen_jax import build  # pylint: disable=g-import-not-at-top
  try:
    build.check_model(config)
  except (ValueError, TypeError) as e:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    fail(prog, f"{where}.model does not build a U-Net: {first}")


def _load_config(prog: str, holder):
  try:
    config = holder.value
    if config is None:
      fail(prog, "--config is required (a config file, e.g. configs/tiny.py).")
    list(config.keys())  # config_flags defers load errors to first access
    return config
  except (IOError, OSError, SyntaxError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(lines) if "Errno" in ln or "Error" in ln),
                  lines[-1] if lines else str(e))
    fail(prog, f"cannot load the config file: {detail}")
