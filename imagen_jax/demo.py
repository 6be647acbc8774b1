"""`imagen-demo`: the whole product in one command on the embedded default.

  imagen-demo --workdir=DIR                       # shapes, ~20 min on 2 cores
  imagen-demo --workdir=DIR --config=configs/demo.py:digits
  python -m imagen_jax.demo --workdir=DIR          (the same)

Steps (each resumes where it stopped when the command is run again):
  1. renders the built-in dataset into tfds (nothing is downloaded),
  2. encodes every caption with the frozen T5 into the embedding store,
  3. trains the base stage (DIR/base) and 4. the super-resolution stage
     (DIR/sr), both with the ordinary training loop (checkpoints, metrics),
  5. samples the cascade for the alignment prompt suite (prompts held out of
     training included) and scores the images: DIR/report.json, DIR/eval/.

Exit codes as imagen-train: 0 done; 2 bad flags or config; 3 non-finite
training; 75 preempted (SIGTERM) after saving: run it again to continue.
"""

from __future__ import annotations

import copy
import os
import sys
import time

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from imagen_jax import demo_config
from imagen_jax import fileio
from imagen_jax import host_malloc

PROG = "imagen-demo"
_F: dict = {}


def _define_flags() -> None:
  """CLI flags, defined only when run as the CLI (see embed._define_flags)."""
  _F["config"] = config_flags.DEFINE_config_file(
      "config", demo_config.__file__,
      "Demo config (default: the embedded shapes demo; variants: "
      "--config=configs/demo.py:digits or :quick).")
  _F["workdir"] = flags.DEFINE_string("workdir", None, "Run directory.")


def stage_config(config: ml_collections.ConfigDict, which: str, workdir: str,
                 text_dim: int = 0) -> ml_collections.ConfigDict:
  """The full training config of stage ``which`` ("base" or "sr")."""
  c = copy.deepcopy(config[which])
  with c.unlocked():
    c.text = copy.deepcopy(config.text)
    c.data = copy.deepcopy(config.data)
    c.embed = copy.deepcopy(config.embed)
  c.data.store = os.path.join(workdir, "embeddings")
  if text_dim:
    c.model.text_dim = text_dim
  return c


def _banner(config, workdir: str) -> str:
  t = config.text
  return (f"imagen-demo ({config.variant}): dataset {config.data.source}, "
          f"text encoder T5-{t.t5} ({t.source} weights"
          f"{', NOT pretrained: none can ship with the package' if t.source == 'random' else ''}), "
          f"base {config.base.resolution}px -> SR {config.sr.resolution}px; "
          f"workdir {workdir}")


def run(config: ml_collections.ConfigDict, workdir: str,
        progress: bool = True) -> dict:
  """Runs (or resumes) the demo; returns the report (also DIR/report.json)."""
  from imagen_jax import embed  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import main as eval_main  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import store as store_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  timings = {}
  say = print if progress else (lambda *a, **k: None)
  say(_banner(config, workdir), flush=True)
  fileio.makedirs(workdir)
  fileio.write_json(os.path.join(workdir, "demo_config.json"), config.to_dict())

  say(f"[1/4] dataset + T5 embeddings -> {workdir}/embeddings", flush=True)
  t = time.perf_counter()
  manifest = embed.run_embed(stage_config(config, "base", workdir), workdir,
                             progress=progress)
  timings["embed_s"] = round(time.perf_counter() - t, 1)
  text_dim = int(store_lib.EmbeddingStore(os.path.join(
      workdir, "embeddings")).text_encoder["config"]["d_model"])
  say(f"      {manifest['total']} captions embedded "
      f"({timings['embed_s']:.0f}s)", flush=True)

  dirs = {}
  for k, which in enumerate(("base", "sr")):
    c = stage_config(config, which, workdir, text_dim)
    dirs[which] = os.path.join(workdir, which)
    low = f"{c.lowres_resolution}px -> " if c.lowres_resolution else ""
    say(f"[{k + 2}/4] train {which} stage ({low}{c.resolution}px, "
        f"{c.total_steps} steps, batch {c.batch_size}) -> {dirs[which]}",
        flush=True)
    t = time.perf_counter()
    loop.train(c, dirs[which], progress=progress)
    timings[f"train_{which}_s"] = round(time.perf_counter() - t, 1)

  say("[4/4] sample the prompt suite and score alignment", flush=True)
  t = time.perf_counter()
  e = config.eval
  report = eval_main.run([dirs["base"], dirs["sr"]],
                         os.path.join(workdir, "eval"),
                         per_category=int(e.per_category), seed=int(e.seed),
                         batch_size=int(e.batch_size),
                         num_samples=int(e.num_samples), progress=progress)
  timings["eval_s"] = round(time.perf_counter() - t, 1)
  timings["total_s"] = round(time.perf_counter() - t0, 1)
  report["timings"] = timings
  report["variant"] = config.variant
  report["text_encoder"] = {"t5": config.text.t5, "source": config.text.source,
                            "pretrained": config.text.source != "random"}
  fileio.write_json(os.path.join(workdir, "report.json"), report)
  say(eval_main.format_report(report))
  say(f"report: {os.path.join(workdir, 'report.json')} "
      f"(this invocation: {timings['total_s']:.0f}s)")
  return report


def main(argv) -> int:
  """absl main; returns the exit code."""
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments {argv[1:]}; everything is a --flag.")
  config = cli.config_value(PROG, _F["config"])
  if not _F["workdir"].value:
    cli.fail(PROG, "--workdir is required (where data, checkpoints and the "
             "report go), e.g. --workdir=/tmp/imagen-demo.")
  for which in ("base", "sr"):
    cli.check_stage_model(
        PROG, stage_config(config, which, _F["workdir"].value),
        f"config.{which}")
  # Imported after the checks: it loads TensorFlow, whose start-up log lines
  # would bury a one-line error.
  from imagen_jax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.run_as_cli(PROG, run, config, _F["workdir"].value)


def run_main() -> None:
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  run_main()
