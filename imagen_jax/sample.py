"""`imagen-sample`: text -> images with a trained cascade.

  imagen-sample --stages=DIR/base,DIR/sr --prompt "a red circle above a blue square" \
      --num-samples 4 --seed 0 --out out/grid.png [--config.num_steps=50,25]
  python -m imagen_jax.sample ...                                  (the same)

Stages are training workdirs (latest checkpoint, EMA params) or exports
(``imagen-export``), base first. ``--t5`` picks the text encoder: default the
one the stages recorded (rebuilt from its spec), or a spec .json / Hugging
Face directory, which must be the same T5 the stages were trained with.

Writes the grid (prompts as captions) to ``--out``, one PNG per sample next
to it (``<out stem>_000.png`` ...), and ``<out stem>.json`` with every setting
used. Sampling settings default to each stage's training config (its
``sample`` section); ``--config.FIELD=V`` sets one value for every stage and
``--config.FIELD=V1,V2`` (or ``V1;V2``, for values with commas such as
``timesteps``) one per stage. Fields: every ``StageSettings`` field
(``imagen_jax/config_defaults.py``; listed by ``--help``), mesh_shape
(data,fsdp,tensor), use_ema, and kernels (``model.kernels`` for every
stage, e.g. ``cudnn`` on NVIDIA GPUs; default: each stage's own).

Exit codes: 0 done; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from imagen_jax import host_malloc

PROG = "imagen-sample"
# Flags that are not sampling settings; "" for kernels keeps each stage's own.
OTHER_FIELDS = ("mesh_shape", "use_ema", "kernels")


def other_field(name: str):
  """The ``Field`` of a flag in ``OTHER_FIELDS`` (its default and range)."""
  from imagen_jax import config_defaults as cd  # pylint: disable=g-import-not-at-top
  return {"mesh_shape": cd.MESH["shape"],
          "use_ema": cd.Field(True, "sample with the EMA parameters"),
          "kernels": cd.MODEL["kernels"]}[name]


def setting_fields() -> tuple[str, ...]:
  """The sampling settings ``--config.FIELD`` takes: ``StageSettings``' fields."""
  from imagen_jax import config_defaults  # pylint: disable=g-import-not-at-top
  return tuple(config_defaults.StageSettings.fields())


def setting_help() -> str:
  """One line per sampling setting: name, meaning, what it accepts."""
  from imagen_jax import config_defaults  # pylint: disable=g-import-not-at-top
  return "\n".join(
      f"  --config.{name}: {spec.doc} ({spec.accepts()}; default: the stage's "
      f"config)" for name, spec in config_defaults.StageSettings.fields().items())


def _fail(message: str) -> None:
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  cli.fail(PROG, message)


def parse_overrides(args: Sequence[str]) -> dict:
  """``--config.FIELD=VALUE`` arguments -> {FIELD: VALUE} (one-line errors)."""
  out = {}
  for a in args:
    if not a.startswith("--config.") or "=" not in a:
      _fail(f"unexpected argument {a!r}; settings are --config.FIELD=VALUE.")
    key, value = a[len("--config."):].split("=", 1)
    if key not in setting_fields() and key not in OTHER_FIELDS:
      _fail(f"unknown config field --config.{key}; choose from "
            f"{', '.join(setting_fields() + tuple(OTHER_FIELDS))}.")
    if key in setting_fields():
      # Checked now, before any stage is loaded; one value or one per stage.
      from imagen_jax import config_defaults  # pylint: disable=g-import-not-at-top
      spec = config_defaults.StageSettings.fields()[key]
      for part in config_defaults.stage_values(key, value):
        if part.strip():
          try:
            spec.parse(key, part)
          except ValueError as e:
            _fail(str(e))
    if key in OTHER_FIELDS and value.strip():
      try:
        other_field(key).parse(key, value)
      except ValueError as e:
        _fail(str(e))
    out[key] = value
  return out


def read_prompts(prompts: Optional[Sequence[str]], prompts_file: Optional[str]
                 ) -> list[str]:
  """Prompts from ``--prompt`` (repeatable) and ``--prompts-file`` (one per
  line; blank lines and lines starting with # skipped)."""
  from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
  out = list(prompts or [])
  if prompts_file:
    if not fileio.isfile(prompts_file):
      _fail(f"--prompts-file {prompts_file!r} does not exist.")
    text = fileio.read_bytes(prompts_file).decode("utf-8")
    out += [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith("#")]
  if not out:
    _fail("no prompts: give --prompt \"...\" or --prompts-file FILE.")
  return out


def _parse_args(argv):
  p = argparse.ArgumentParser(
      prog=PROG, description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="sampling settings (one value, or one per stage: V1,V2 or "
      "V1;V2):\n"
      + setting_help())
  p.add_argument("--stages", required=True,
                 help="Stage dirs (workdirs or exports), base first, comma-separated.")
  p.add_argument("--t5", default=None, help="T5 spec .json or HF directory.")
  p.add_argument("--prompt", action="append", help="A prompt (repeatable).")
  p.add_argument("--prompts-file", default=None, help="One prompt per line.")
  p.add_argument("--negative-prompt", default=None,
                 help="Guide away from this text instead of the null text.")
  p.add_argument("--num-samples", type=int, default=1, help="Images per prompt.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="samples/grid.png", help="Grid PNG path.")
  p.add_argument("--stop-after", type=int, default=None,
                 help="Index of the last stage to run (0: base only).")
  p.add_argument("--start-image", default=None,
                 help="Super-resolve this image (PNG/JPEG) instead of running "
                      "the base stage; it enters the first SR stage.")

  def error(message):
    _fail(message)
  p.error = error  # one line + exit 2 instead of argparse's usage dump
  return p.parse_known_args(argv)


def _load_start_image(path: str, size: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  if not fileio.isfile(path):
    _fail(f"--start-image {path!r} does not exist.")
  img = preprocess.decode_rgb(fileio.read_bytes(path))
  if img is None:
    _fail(f"--start-image {path!r} is not a readable image.")
  return np.asarray(preprocess.resize_center_crop(img, size))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI main; returns the exit code."""
  args, rest = _parse_args(list(sys.argv[1:] if argv is None else argv))
  overrides = parse_overrides(rest)
  stage_dirs = [s for s in args.stages.split(",") if s]
  prompts = read_prompts(args.prompt, args.prompts_file)
  if args.num_samples < 1:
    _fail(f"--num-samples {args.num_samples} must be >= 1.")
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  cli.setup_logging_and_cache()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
  from imagen_jax import images as images_lib  # pylint: disable=g-import-not-at-top

  # Checked by parse_overrides; "" or absent: the default.
  mesh_shape, use_ema = (
      other_field(k).parse(k, overrides[k]) if overrides.get(k, "").strip()
      else other_field(k).default for k in ("mesh_shape", "use_ema"))
  t0 = time.perf_counter()
  try:
    cas = cascade_lib.Cascade.load(stage_dirs, t5=args.t5, use_ema=use_ema,
                                   mesh_shape=mesh_shape,
                                   kernels=overrides.get("kernels") or None)
    settings = cascade_lib.resolve_settings(
        [s.config for s in cas.stages],
        {k: v for k, v in overrides.items() if k in setting_fields()})
    start_image, start_stage = None, 0
    if args.start_image:
      sr = next((i for i, s in enumerate(cas.stages) if s.stage.is_sr), None)
      if sr is None:
        _fail("--start-image needs a super-resolution stage in --stages.")
      start_stage = sr
      start_image = _load_start_image(args.start_image,
                                      cas.stages[sr].stage.lowres_resolution)
      start_image = np.repeat(start_image[None], len(prompts), 0)
    negative = ([args.negative_prompt] * len(prompts)
                if args.negative_prompt else None)
    print(f"{PROG}: {len(prompts)} prompt(s) x {args.num_samples} sample(s), "
          f"stages {' -> '.join(f'{s.resolution}px' for s in cas.stages)}",
          flush=True)
    outputs = cas.sample(prompts, settings=settings,
                         num_samples=args.num_samples, seed=args.seed,
                         negative_prompts=negative, stop_after=args.stop_after,
                         start_image=start_image, start_stage=start_stage,
                         progress=True)
  except cascade_lib.CascadeError as e:
    _fail(str(e))
  except ValueError as e:
    _fail(str(e))
  final = outputs[-1]
  captions = [p for p in prompts for _ in range(args.num_samples)]
  out = args.out
  stem = os.path.splitext(out)[0]
  images_lib.save_grid(final, out, captions, ncol=args.num_samples
                       if len(prompts) > 1 else 0)
  files = images_lib.save_each(final, stem)
  sidecar = {
      "prompts": prompts, "num_samples": args.num_samples, "seed": args.seed,
      "negative_prompt": args.negative_prompt,
      "stages": [{"path": s.path, "step": s.step, "resolution": s.resolution,
                  "settings": dataclasses.asdict(st)}
                 for s, st in zip(cas.stages, settings)],
      "stop_after": args.stop_after, "start_image": args.start_image,
      "use_ema": use_ema, "mesh_shape": list(mesh_shape),
      "kernels": [str(s.config.model.kernels) for s in cas.stages],
      "text_encoder": cas.text_encoder.spec,
      "grid": out, "images": files, "captions": captions,
      "elapsed_s": round(time.perf_counter() - t0, 2),
  }
  fileio.write_json(stem + ".json", sidecar)
  print(f"{PROG}: wrote {out}, {len(files)} images and {stem}.json", flush=True)
  return 0


def run_main() -> None:
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  sys.exit(main())


if __name__ == "__main__":
  run_main()
