"""`imagen-eval`: sample the cascade for the prompt suite and score alignment.

  imagen-eval --workdir=DIR                 # a demo workdir (DIR/base, DIR/sr)
  imagen-eval --stages=BASE_DIR,SR_DIR --out=DIR/eval [--per_category=24]
  python -m imagen_jax.eval ...             (the same)

Writes ``OUT/report.json`` (scores overall, per category and on prompts never
seen in training, every prompt with its scores, the settings used),
``OUT/grid.png`` (samples with their prompts) and ``OUT/samples/*.png``.
The dataset (and so the suite) is the one the base stage was trained on
(``data`` in its config.json); the seed fixes every image.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import ml_collections
import numpy as np

from imagen_jax import fileio
from imagen_jax import host_malloc

PROG = "imagen-eval"
# Sampling settings the CLI can override (one value or one per stage).
_OVERRIDABLE = ("sampler", "num_steps", "guidance_scale", "aug_level",
                "threshold")


def _sample_batches(cascade, texts, settings, *, seed: int, batch_size: int,
                    num_samples: int, progress: bool, label: str,
                    start_image: Optional[np.ndarray] = None,
                    start_stage: int = 0) -> list[np.ndarray]:
  """Every run stage's images for ``texts``, sampled in fixed-size batches.

  The last batch is padded, so every call has the same shape and compiles
  once; batch ``b`` uses seed ``seed + b``.

  Returns:
    One uint8 ``[len(texts) * num_samples, R_i, R_i, 3]`` array per stage run.
  """
  n_batches = -(-len(texts) // batch_size)
  per_stage: list[list[np.ndarray]] = []
  for b in range(n_batches):
    lo, hi = b * batch_size, (b + 1) * batch_size
    chunk = texts[lo:hi]
    real = len(chunk)
    pad = batch_size - real if n_batches > 1 else 0
    chunk = chunk + [chunk[-1]] * pad
    kw = {}
    if start_image is not None:
      img = start_image[lo:hi]
      img = np.concatenate([img, np.repeat(img[-1:], pad, 0)]) if pad else img
      kw = dict(start_image=img, start_stage=start_stage)
    outs = cascade.sample(chunk, settings=settings, num_samples=num_samples,
                          seed=seed + b, progress=progress, **kw)
    if not per_stage:
      per_stage = [[] for _ in outs]
    for acc, imgs in zip(per_stage, outs):
      acc.append(imgs[:real * num_samples])
    if progress:
      print(f"eval ({label}): batch {b + 1}/{n_batches} sampled", flush=True)
  return [np.concatenate(acc) for acc in per_stage]


def _diagnostics(cascade, prompts, expanded, stage_images, settings, *,
                 data, seed: int, batch_size: int, num_samples: int,
                 score, progress: bool) -> dict:
  """The rows of ``diagnostics.ROWS`` that apply to this suite and cascade."""
  from imagen_jax.eval import diagnostics as diag  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import digits_eval  # pylint: disable=g-import-not-at-top
  res = stage_images[-1].shape[1]
  rows = {}
  has_scenes = data is not None and all(p.scene is not None for p in prompts)
  if has_scenes:
    truth = diag.reference_images(prompts, data, res)
    rows["ceiling"] = diag.headline(score(np.repeat(truth, num_samples, 0)))
    base_res = cascade.stages[0].resolution
    rows["base_resolution_ceiling"] = diag.headline(score(np.repeat(
        diag.through_resolution(truth, base_res), num_samples, 0)))
    last = len(cascade.stages) - 1
    if last > 0:
      low_res = cascade.stages[last].stage.lowres_resolution
      low = diag.reference_images(prompts, data, low_res)
      sr = _sample_batches(cascade, [p.text for p in prompts], settings,
                           seed=seed, batch_size=batch_size,
                           num_samples=num_samples, progress=progress,
                           label="sr_only", start_image=low,
                           start_stage=last)[-1]
      rows["sr_only"] = diag.headline(score(diag.resize_bicubic(sr, res)))
  elif prompts and prompts[0].category == "digit":
    rows["ceiling"] = {"accuracy": digits_eval.ceiling(res), "n": len(expanded)}
  if len(cascade.stages) > 1:
    rows["base_only"] = diag.headline(score(
        diag.resize_bicubic(stage_images[0], res)))
  return rows


def evaluate(cascade, prompts, settings, *, out_dir: str, seed: int = 0,
             batch_size: int = 64, num_samples: int = 1,
             progress: bool = True, data=None) -> dict:
  """Samples every prompt of a suite and scores the final stage's images.

  Args:
    cascade: a loaded ``imagen_jax.cascade.Cascade``.
    prompts: ``suite.Prompt`` list.
    settings: one ``StageSettings`` per stage.
    out_dir: where the report, grid and samples go.
    seed: sampling seed (batch ``b`` uses ``seed + b``).
    batch_size: prompts sampled per call (the last batch is padded, so every
      call has the same shape and compiles once).
    num_samples: images per prompt.
    progress: print per-batch lines.
    data: the ``config.data`` section the suite came from; with it, a shapes
      suite also gets the ground-truth rows of the stage diagnostics.

  Returns:
    The report dict (also written to ``out_dir/report.json``): scores of the
    cascade's images, and ``diagnostics`` (``eval.diagnostics.ROWS``).
  """
  from imagen_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import diagnostics as diag  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import suite as suite_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  texts = [p.text for p in prompts]
  stage_images = _sample_batches(cascade, texts, settings, seed=seed,
                                 batch_size=batch_size,
                                 num_samples=num_samples, progress=progress,
                                 label="cascade")
  images = stage_images[-1]                           # [P * S, R, R, 3]
  expanded = [p for p in prompts for _ in range(num_samples)]
  data_source = "digits" if expanded[0].category == "digit" else "shapes"
  score = ((lambda ims: suite_lib.score_digits(ims, expanded))
           if data_source == "digits"
           else (lambda ims: suite_lib.score_shapes(ims, expanded)))
  scored = score(images)
  rows = scored.pop("rows")
  diagnostics = _diagnostics(cascade, prompts, expanded, stage_images,
                             settings, data=data, seed=seed,
                             batch_size=batch_size, num_samples=num_samples,
                             score=score, progress=progress)
  diagnostics["cascade"] = diag.headline(scored)
  fileio.makedirs(os.path.join(out_dir, "samples"))
  paths = images_lib.save_each(images, os.path.join(out_dir, "samples", "sample"))
  grid_path = images_lib.save_grid(images, os.path.join(out_dir, "grid.png"),
                                   [p.text for p in expanded])
  report = dict(scored)
  report["diagnostics"] = {k: diagnostics[k] for k in diag.ROWS
                           if k in diagnostics}
  report["prompts"] = [
      {"prompt": p.text, "category": p.category, "seen_in_training": p.seen,
       "scores": r, "image": os.path.relpath(path, out_dir)}
      for p, r, path in zip(expanded, rows, paths)]
  report["grid"] = grid_path
  report["settings"] = {"seed": seed, "num_samples": num_samples,
                        "stages": [dataclasses.asdict(s) for s in settings]}
  report["stages"] = [{"path": s.path, "step": s.step,
                       "resolution": s.resolution} for s in cascade.stages]
  report["elapsed_s"] = round(time.perf_counter() - t0, 1)
  fileio.write_json(os.path.join(out_dir, "report.json"), report)
  return report


def format_report(report: dict) -> str:
  """Human-readable lines for a report."""
  def fmt(d):
    keys = ("all_correct", "color", "shape", "count", "position", "size")
    return "  ".join(f"{k} {d[k]:.2f}" for k in keys if d.get(k) is not None) \
        + f"  (n={d.get('n', 0)})"
  lines = []
  if "shapes" in report:
    lines.append(f"shapes alignment, all prompts: {fmt(report['shapes'])}")
    for cat, d in report["by_category"].items():
      lines.append(f"  {cat:9s} {fmt(d)}")
    if report["unseen"].get("n"):
      lines.append(f"  unseen    {fmt(report['unseen'])}")
  if "digits" in report:
    d = report["digits"]
    lines.append(f"digits: accuracy {d['accuracy']:.3f} (classifier ceiling on "
                 f"real test digits {d['ceiling']:.3f}, n={d['n']})")
  if report.get("diagnostics"):
    from imagen_jax.eval import diagnostics as diag  # pylint: disable=g-import-not-at-top
    lines.append(diag.format_table(report["diagnostics"]))
  lines.append(f"grid: {report['grid']}")
  return "\n".join(lines)


def run(stage_dirs: Sequence[str], out_dir: str, *, per_category: int = 24,
        seed: int = 0, batch_size: int = 64, num_samples: int = 1,
        overrides: Optional[dict] = None, progress: bool = True,
        suite_seed: Optional[int] = None) -> dict:
  """Loads the cascade from stage dirs, builds the suite, evaluates.

  ``suite_seed`` draws the shapes prompts with another seed than the
  dataset's (a second suite of the same grammar); see ``evaluate`` for the
  rest.
  """
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import suite as suite_lib  # pylint: disable=g-import-not-at-top
  cas = cascade_lib.Cascade.load(stage_dirs)
  data = ml_collections.ConfigDict(cas.stages[0].config.data.to_dict())
  prompts = suite_lib.suite_for(data, per_category, suite_seed)
  settings = cascade_lib.resolve_settings([s.config for s in cas.stages],
                                          overrides)
  return evaluate(cas, prompts, settings, out_dir=out_dir, seed=seed,
                  batch_size=batch_size, num_samples=num_samples,
                  progress=progress, data=data)


def main(argv=None) -> int:
  """CLI entry; returns the exit code."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  fl = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Demo workdir (stages DIR/base, DIR/sr).",
                      flag_values=fl)
  flags.DEFINE_list("stages", None, "Stage dirs, base first.", flag_values=fl)
  flags.DEFINE_string("out", None, "Output dir (default WORKDIR/eval).",
                      flag_values=fl)
  flags.DEFINE_integer("per_category", 24, "Prompts per suite category.",
                       flag_values=fl)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fl)
  flags.DEFINE_integer("batch_size", 64, "Prompts per sampling call.",
                       flag_values=fl)
  flags.DEFINE_integer("num_samples", 1, "Images per prompt.", flag_values=fl)
  flags.DEFINE_integer("suite_seed", None, "Draw the shapes prompts with this "
                       "seed (default: the dataset's): another suite of the "
                       "same grammar.", flag_values=fl)
  for name in _OVERRIDABLE:
    flags.DEFINE_string(name, "", f"Override {name} (one value, or one per "
                        "stage, comma-separated).", flag_values=fl)
  try:
    fl(list(argv or sys.argv))
  except flags.Error as e:
    cli.fail(PROG, str(e))
  if fl.stages:
    stage_dirs = fl.stages
  elif fl.workdir:
    stage_dirs = [os.path.join(fl.workdir, "base"), os.path.join(fl.workdir, "sr")]
  else:
    cli.fail(PROG, "give --workdir=DEMO_DIR or --stages=BASE_DIR,SR_DIR.")
  out = fl.out or os.path.join(fl.workdir or stage_dirs[-1], "eval")
  cli.setup_logging_and_cache()
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  overrides = {k: fl[k].value for k in _OVERRIDABLE}
  try:
    report = run(stage_dirs, out, per_category=fl.per_category, seed=fl.seed,
                 batch_size=fl.batch_size, num_samples=fl.num_samples,
                 overrides=overrides, suite_seed=fl.suite_seed)
  except (cascade_lib.CascadeError, ValueError) as e:
    cli.fail(PROG, str(e))
  print(format_report(report))
  print(f"report: {os.path.join(out, 'report.json')}")
  return 0


def run_main() -> None:
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  sys.exit(main())


if __name__ == "__main__":
  run_main()
