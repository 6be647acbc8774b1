"""`imagen-export`: a stage's EMA params alone, with its config, for sharing.

  imagen-export --workdir=RUN_DIR --out=EXPORT_DIR [--raw]
  python -m imagen_jax.export ...                         (the same)

The export (orbax ``params/``, ``stage.json``, ``text_encoder.json``) holds no
optimizer state; ``imagen-sample --stages=EXPORT_DIR,...`` and
``config.init_from`` read it like a training workdir.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from imagen_jax import host_malloc

PROG = "imagen-export"


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI main; returns the exit code."""
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="Training workdir.")
  p.add_argument("--out", required=True, help="Export directory.")
  p.add_argument("--raw", action="store_true",
                 help="Export the raw training params instead of the EMA.")
  p.error = lambda message: cli.fail(PROG, message)
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  cli.setup_logging_and_cache()
  from imagen_jax import cascade  # pylint: disable=g-import-not-at-top
  try:
    out = cascade.export_stage(args.workdir, args.out, use_ema=not args.raw)
  except cascade.CascadeError as e:
    cli.fail(PROG, str(e))
  print(f"{PROG}: wrote {out}")
  return 0


def run_main() -> None:
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  sys.exit(main())


if __name__ == "__main__":
  run_main()
