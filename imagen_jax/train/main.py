"""`imagen-train`: train one stage.

  imagen-train --config=configs/tiny.py --workdir=/tmp/tiny [--config.x=y ...]
  python -m imagen_jax.train ...                                  (the same)

Multi-host: on TPU pods and SLURM jax finds its peers itself; elsewhere pass
--coordinator=host:port --num_processes=N --process_id=i (or set
IMAGEN_COORDINATOR / IMAGEN_NUM_PROCESSES / IMAGEN_PROCESS_ID).

Exit codes: 0 done; 2 bad flags or config (one line on stderr); 3 too many
non-finite steps in a row; 75 preempted by SIGTERM after saving (restart to
continue).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax import host_malloc

PROG = "imagen-train"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process.")
_STOP_AT = flags.DEFINE_integer("stop_at", None,
                                "Stop after a checkpoint at this step.")


def main(argv) -> int:
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments {argv[1:]}; everything is a --flag.")
  config = cli.config_value(PROG, _CONFIG)
  if _WORKDIR.value is None:
    cli.fail(PROG, "--workdir is required.")
  from imagen_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  # After the distributed start: tracing the model starts JAX's backend.
  cli.check_stage_model(PROG, config)
  # Imported after the checks: it loads TensorFlow, whose start-up log lines
  # would bury a one-line error.
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.run_as_cli(PROG, loop.train, config, _WORKDIR.value,
                         stop_at=_STOP_AT.value)


def run_main():
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  run_main()
