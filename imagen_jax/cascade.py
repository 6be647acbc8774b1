"""The text -> base -> SR -> SR pipeline used by the CLI, the demo and notebooks.

A ``Cascade`` holds a frozen T5 ``TextEncoder`` and one ``LoadedStage`` per
stage (its config, ``Stage`` and EMA params). Stages load from training
workdirs (latest checkpoint; EMA params unless told otherwise) or from
exports (``export_stage``: params alone + the stage's config + its text
encoder spec). Loading checks that the stages chain (each SR stage's low-res
size is the previous stage's resolution, every stage reads the same T5) and
the T5 is rebuilt from the recorded spec when none is given.

Sampling: each stage's whole loop is one compiled function (``lax.scan``)
with classifier-free guidance batched into one network call per step; the
compiled functions are cached per (stage, batch shape, settings), so a second
call with the same settings compiles nothing. The batch is sharded over the
mesh's data axes and params over fsdp/tensor, as in training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from imagen_jax import build
from imagen_jax import config_defaults
from imagen_jax import fileio
from imagen_jax import kernels as kernels_lib
from imagen_jax import parallel
from imagen_jax.stage import SampleInputs, Stage, StageSettings, to_float_image
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.train import checkpoint as ckpt_lib


class CascadeError(ValueError):
  """A cascade that cannot be built or run as asked (one-line message)."""


def resolve_settings(stage_configs: Sequence[ml_collections.ConfigDict],
                     overrides: Optional[dict] = None) -> list[StageSettings]:
  """Each stage's sampling settings: its config's ``sample`` section, then
  ``overrides``.

  Args:
    stage_configs: the stages' configs, base first.
    overrides: setting name -> value; a value is one setting for every stage
      or a string with one per stage ("50,25", "smart27;smart50": see
      ``config_defaults.stage_values``); "" or None leaves the stages' own.
      Strings are parsed as the setting's type.

  Returns:
    One ``StageSettings`` per stage, each checked against its fields' ranges.
  """
  fields = config_defaults.StageSettings.fields()
  out = []
  for i, cfg in enumerate(stage_configs):
    s = dataclasses.asdict(config_defaults.StageSettings.from_config(cfg.sample))
    for name, value in (overrides or {}).items():
      if name not in fields:
        raise CascadeError(f"Unknown sampling setting {name!r}; choose from "
                           f"{', '.join(fields)}.")
      if value is None or value == "":
        continue
      parts = (config_defaults.stage_values(name, value)
               if isinstance(value, str) else [value])
      if len(parts) not in (1, len(stage_configs)):
        raise CascadeError(
            f"{name}={value!r} gives {len(parts)} values for "
            f"{len(stage_configs)} stages; give one, or one per stage "
            f"separated by '{config_defaults.STAGE_SEPARATOR}'.")
      v = parts[0] if len(parts) == 1 else parts[i]
      if isinstance(v, str) and not v.strip():
        continue
      try:
        s[name] = (fields[name].parse(f"sample.{name}", v) if isinstance(v, str)
                   else v)
      except ValueError as e:
        raise CascadeError(str(e)) from None
    settings = config_defaults.StageSettings.from_config(s)
    try:
      settings.check()
    except ValueError as e:
      raise CascadeError(str(e)) from None
    problem = config_defaults.timesteps_problem(settings.timesteps,
                                                cfg.diffusion.schedule)
    if problem:
      raise CascadeError(f"stage {i}: {problem}")
    out.append(settings)
  return out


@dataclasses.dataclass
class PreparedBatch:
  """A sampling request laid out on the mesh (``Cascade.prepare``).

  Attributes:
    inputs: text and negative text, ``[N', ...]`` with N' = N + padding.
    start_image: the start image ``[N', h, w, 3]`` uint8, or None.
    num_images: N, the images asked for (rows past it are padding).
  """
  inputs: SampleInputs
  start_image: Optional[jax.Array]
  num_images: int


@dataclasses.dataclass
class LoadedStage:
  """A stage ready to sample: where it came from, its config, Stage, params."""
  path: str
  config: ml_collections.ConfigDict
  stage: Stage
  params: Any
  text_encoder_spec: dict
  step: Optional[int] = None

  @property
  def resolution(self) -> int:
    return self.stage.resolution


def _load_config_json(path: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fileio.read_json(path))


def load_stage(path: str, mesh: Mesh, use_ema: bool = True,
               kernels: Optional[str] = None) -> LoadedStage:
  """Loads a stage from a training workdir or an export directory.

  Args:
    path: the workdir or export.
    mesh: device mesh the params are sharded over.
    use_ema: EMA params (default) or the raw training params.
    kernels: ``model.kernels`` to sample with instead of the stage's own
      (the parameters do not depend on it).

  Returns:
    The loaded stage.
  """
  if not fileio.isdir(path):
    raise CascadeError(f"Stage directory {path!r} does not exist.")
  export = fileio.isfile(os.path.join(path, "stage.json"))
  cfg_file = os.path.join(path, "stage.json" if export else "config.json")
  if not fileio.isfile(cfg_file):
    raise CascadeError(f"{path!r} is neither a training workdir (no config.json) "
                       "nor an export (no stage.json).")
  config = _load_config_json(cfg_file)
  if kernels:
    try:
      kernels_lib.resolve(kernels)
    except ValueError as e:
      raise CascadeError(str(e)) from None
    config.model.kernels = kernels
  spec_file = os.path.join(path, "text_encoder.json")
  spec = fileio.read_json(spec_file) if fileio.isfile(spec_file) else None
  if not spec:
    raise CascadeError(f"{path!r} records no text encoder (text_encoder.json); "
                       "it cannot be sampled from text.")
  stage = Stage.from_config(config)
  boxed = jax.eval_shape(lambda: stage.unet.init(
      jax.random.PRNGKey(0), **build.unet_inputs(config, 1, 4)))
  shardings = parallel.param_shardings(boxed, mesh)["params"]
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(boxed)["params"])
  step = None
  if not export:
    step = ckpt_lib.latest_step(path)
    if step is None:
      raise CascadeError(f"Training workdir {path!r} has no committed checkpoint "
                         "yet; train it first.")
  params = ckpt_lib.restore_params(path, abstract, shardings, use_ema=use_ema)
  return LoadedStage(path, config, stage, params, spec, step)


def check_chain(stages: Sequence[LoadedStage], d_model: Optional[int] = None
                ) -> None:
  """Raises one clear line unless the stages form a cascade."""
  if not stages:
    raise CascadeError("A cascade needs at least one stage.")
  if stages[0].stage.is_sr:
    raise CascadeError(f"The first stage ({stages[0].path}) is a super-resolution "
                       "stage; start with a base stage (or pass --start-image).")
  for prev, cur in zip(stages, stages[1:]):
    if not cur.stage.is_sr:
      raise CascadeError(f"Stage {cur.path} is a base stage, but it follows "
                         f"{prev.path}; only the first stage may be a base stage.")
    if cur.stage.lowres_resolution != prev.resolution:
      raise CascadeError(
          f"Stage chain mismatch: {cur.path} expects {cur.stage.lowres_resolution}px "
          f"inputs but {prev.path} produces {prev.resolution}px images.")
  for s in stages:
    width = int(s.config.model.text_dim)
    if d_model is not None and width != d_model:
      raise CascadeError(f"Stage {s.path} reads {width}-wide text embeddings but "
                         f"the T5 encoder gives {d_model}; use the T5 it was "
                         "trained with.")
  ref = stages[0].text_encoder_spec
  for s in stages[1:]:
    got = s.text_encoder_spec
    if (ref.get("source") == got.get("source") == "hf"
        and ref.get("checkpoint") != got.get("checkpoint")):
      # Separately converted stages (IF-I and IF-II each ship a copy of the
      # same T5) record two directories; one encoder serves a cascade.
      raise CascadeError(
          f"Stages {stages[0].path} and {s.path} record different T5 "
          f"directories ({ref.get('checkpoint')} and {got.get('checkpoint')});"
          f" a cascade encodes with one: convert {s.path} again with "
          f"imagen-convert --text_encoder={ref.get('checkpoint')}.")
    try:
      encoder_lib.check_same_encoder(ref, s.text_encoder_spec, s.path)
    except ValueError as e:
      raise CascadeError(str(e)) from None


class Cascade:
  """Text encoder + stages, with cached compiled samplers (see module doc)."""

  def __init__(self, stages: Sequence[LoadedStage],
               text_encoder: encoder_lib.TextEncoder, mesh: Mesh):
    check_chain(stages, text_encoder.d_model)
    self.stages = list(stages)
    self.text_encoder = text_encoder
    self.mesh = mesh
    self._compiled: dict = {}
    self.compilations = 0
    self._bar = None

  @classmethod
  def load(cls, stage_dirs: Sequence[str], *, t5: Optional[str] = None,
           use_ema: bool = True, mesh: Optional[Mesh] = None,
           mesh_shape: Sequence[int] = (-1, 1, 1),
           kernels: Optional[str] = None) -> "Cascade":
    """Loads stages and the T5 they were trained with.

    Args:
      stage_dirs: training workdirs or exports, base stage first.
      t5: None (rebuild the T5 the stages record), a JSON spec file, or a
        Hugging Face directory; a T5 that differs from the recorded one is
        refused.
      use_ema: EMA params (default) or the raw training params.
      mesh: device mesh; default: all devices with ``mesh_shape``.
      mesh_shape: (data, fsdp, tensor) when no mesh is given.
      kernels: ``model.kernels`` for every stage (e.g. "cudnn" on NVIDIA
        GPUs); None keeps each stage's own.

    Returns:
      The cascade.
    """
    mesh = mesh or parallel.make_mesh(mesh_shape)
    stages = [load_stage(d, mesh, use_ema, kernels) for d in stage_dirs]
    check_chain(stages)
    spec = stages[0].text_encoder_spec
    if t5 is None:
      enc = encoder_lib.TextEncoder.from_spec(spec, mesh=mesh)
    elif fileio.isfile(t5) and t5.endswith(".json"):
      enc = encoder_lib.TextEncoder.from_spec(fileio.read_json(t5), mesh=mesh)
    elif fileio.isdir(t5):
      enc = encoder_lib.TextEncoder.from_hf(t5, max_length=spec["max_length"],
                                            mesh=mesh)
    else:
      raise CascadeError(f"--t5 {t5!r} is neither a T5 spec .json nor a Hugging "
                         "Face checkpoint directory.")
    # How the stages read text is theirs, whichever T5 file serves them.
    enc = enc.with_conditioning(spec.get("conditioning", "masked"))
    try:
      encoder_lib.check_same_encoder(spec, enc.spec, f"--t5 {t5}")
    except ValueError as e:
      raise CascadeError(str(e)) from None
    return cls(stages, enc, mesh)

  # --- sampling -------------------------------------------------------------------

  def _step_done(self, i) -> None:
    """Host callback from inside the compiled loop: advance the bar.

    Sharded loops may call it once per device; the bar only moves forward.
    """
    bar = self._bar
    if bar is not None and int(i) + 1 > bar.n:
      bar.update(int(i) + 1 - bar.n)

  def _sampler(self, index: int, settings: StageSettings, inputs: SampleInputs,
               start_logsnr: Optional[float], progress: bool):
    """The compiled sampling loop of a stage (cached; counts compilations).

    The key holds what fixes the traced program: the stage, its settings,
    the inputs' structure (which optional inputs are set) and shapes.
    """
    shapes = tuple(x.shape for x in jax.tree_util.tree_leaves(inputs))
    key = (index, settings, jax.tree_util.tree_structure(inputs), shapes,
           start_logsnr, progress)
    if key not in self._compiled:
      self.compilations += 1
      run = self.stages[index].stage.uint8_sampler(
          settings, start_logsnr=start_logsnr,
          progress_fn=self._step_done if progress else None)
      self._compiled[key] = jax.jit(
          run, out_shardings=parallel.batch_sharding(self.mesh, 4))
    return self._compiled[key]

  def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """T5 embeddings of prompts (see ``TextEncoder.encode``)."""
    return self.text_encoder.encode(list(prompts))

  def validate(self, num_prompts: int, settings: Sequence[StageSettings], *,
               num_samples: int = 1,
               negative_prompts: Optional[Sequence[str]] = None,
               stop_after: Optional[int] = None,
               start_image: Optional[np.ndarray] = None, start_stage: int = 0,
               start_noise_level: Optional[float] = None) -> tuple[int, int]:
    """Checks a ``sample`` request before any work (arguments as there).

    Returns:
      (first, last): the indices of the first and last stage to run.

    Raises:
      CascadeError: one line saying what is wrong and what would do.
    """
    last = len(self.stages) - 1 if stop_after is None else int(stop_after)
    if not 0 <= start_stage <= last < len(self.stages):
      raise CascadeError(f"Stages {start_stage}..{last} do not exist in a "
                         f"{len(self.stages)}-stage cascade.")
    if num_prompts < 1 or num_samples < 1:
      raise CascadeError(f"{num_prompts} prompts x {num_samples} samples: give "
                         "at least one prompt and num_samples >= 1.")
    if len(settings) < last + 1:
      raise CascadeError(f"Got sampling settings for {len(settings)} stages, "
                         f"need {last + 1}.")
    for s in settings:
      try:
        s.check()
      except ValueError as e:
        raise CascadeError(str(e)) from None
    if negative_prompts is not None and len(negative_prompts) != num_prompts:
      raise CascadeError(f"{len(negative_prompts)} negative prompts for "
                         f"{num_prompts} prompts; give one per prompt.")
    stage = self.stages[start_stage].stage
    if start_image is None:
      if stage.is_sr:
        raise CascadeError(f"Stage {start_stage} is a super-resolution stage "
                           "and has no input: start at the base stage or pass "
                           "start_image.")
      if start_noise_level is not None:
        raise CascadeError("start_noise_level needs a start_image to noise.")
      return start_stage, last
    shape = np.shape(start_image)
    n = num_prompts * num_samples
    if len(shape) != 4 or shape[0] not in (num_prompts, n):
      raise CascadeError(f"start_image has shape {shape}; give [P or N, h, w, "
                         f"3] images, one per prompt ({num_prompts}) or per "
                         f"sample ({n}).")
    if not stage.is_sr and start_noise_level is None:
      raise CascadeError(f"Stage {start_stage} is a base stage: a start_image "
                         "there needs start_noise_level (img2img), or start "
                         "at a super-resolution stage.")
    want = stage.lowres_resolution if stage.is_sr else stage.resolution
    if shape[1:3] != (want, want):
      raise CascadeError(f"start_image is {shape[1]}x{shape[2]} but stage "
                         f"{start_stage} takes {want}x{want} inputs.")
    if start_noise_level is not None and (
        stage.is_sr or not 0.0 < float(start_noise_level) <= 1.0):
      raise CascadeError(f"start_noise_level={start_noise_level} is for a base "
                         "start stage and must be in (0, 1].")
    return start_stage, last

  def prepare(self, prompts: Sequence[str], *, num_samples: int = 1,
              negative_prompts: Optional[Sequence[str]] = None,
              start_image: Optional[np.ndarray] = None) -> PreparedBatch:
    """Encodes the prompts and lays the batch out on the mesh.

    Each prompt's embedding is repeated ``num_samples`` times (prompt-major),
    and the batch is padded (repeating its last row) to a multiple of the
    data-parallel size, then sharded over the mesh's data axes.

    Args:
      prompts, num_samples, negative_prompts, start_image: see ``sample``.

    Returns:
      The prepared batch.
    """
    n = len(prompts) * num_samples
    pad = (-n) % parallel.data_parallel_size(self.mesh)

    def layout(x):  # [P, ...] or [N, ...] -> [N + pad, ...], batch-sharded
      x = jnp.asarray(x)
      if x.shape[0] != n:
        x = jnp.repeat(x, num_samples, axis=0)
      if pad:
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)])
      return jax.device_put(x, parallel.batch_sharding(self.mesh, x.ndim))

    text, mask = self.encode(prompts)
    inputs = SampleInputs(text=layout(text), text_mask=layout(mask))
    if negative_prompts is None and self.text_encoder.conditioning == "full":
      # IF's unconditional branch is T5 of the empty caption, not zeros.
      negative_prompts = [""] * len(prompts)
    if negative_prompts is not None:
      neg_text, neg_mask = self.encode(negative_prompts)
      inputs = inputs.replace(negative_text=layout(neg_text),
                              negative_mask=layout(neg_mask))
    start = None
    if start_image is not None:
      start = layout(np.asarray(start_image, np.uint8))
    return PreparedBatch(inputs=inputs, start_image=start, num_images=n)

  def run_stage(self, index: int, settings: StageSettings,
                inputs: SampleInputs, images: Optional[jax.Array], rng: jax.Array,
                *, start_noise_level: Optional[float] = None,
                progress: bool = False) -> jax.Array:
    """Runs one stage's compiled sampling loop on a prepared batch.

    Args:
      index: the stage.
      settings: its sampling settings.
      inputs: the prepared text (and negative text), ``PreparedBatch.inputs``.
      images: the previous stage's images (or the start image), uint8
        ``[N', h, w, 3]``: an SR stage's low-res input, or with
        ``start_noise_level`` a base stage's init image; else None.
      rng: PRNG key of this stage.
      start_noise_level: base stage: img2img from ``images`` noised to this t.
      progress: a progress bar (steps, steps/s).

    Returns:
      uint8 images ``[N', R, R, 3]``, still padded and on the devices.
    """
    stage = self.stages[index].stage
    start_logsnr = None
    if stage.is_sr:
      if images is None:
        raise CascadeError(f"Stage {index} is a super-resolution stage and has "
                           "no input: run the stage before it or pass "
                           "start_image.")
      inputs = inputs.replace(lowres=images)
    elif images is not None and start_noise_level is not None:
      start_logsnr = float(stage.logsnr_schedule()(jnp.float32(start_noise_level)))
      inputs = inputs.replace(init_image=images)
    fn = self._sampler(index, settings, inputs, start_logsnr, progress)
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=settings.num_steps, unit="step", dynamic_ncols=True,
                       desc=f"stage {index} ({stage.resolution}px, "
                       f"{inputs.text.shape[0]} images)")
    try:
      with parallel.sharding_context(self.mesh):
        out = fn(self.stages[index].params, inputs, rng)
      out = jax.block_until_ready(out)
      jax.effects_barrier()  # every step callback has run
    finally:
      if self._bar is not None:
        self._bar.close()
        self._bar = None
    return out

  def sample(self, prompts: Sequence[str], *, settings: Sequence[StageSettings],
             num_samples: int = 1, seed: int = 0,
             negative_prompts: Optional[Sequence[str]] = None,
             stop_after: Optional[int] = None,
             start_image: Optional[np.ndarray] = None, start_stage: int = 0,
             start_noise_level: Optional[float] = None,
             progress: bool = False) -> list[np.ndarray]:
    """Runs the cascade; returns every stage's images (uint8).

    ``validate``, then ``prepare``, then ``run_stage`` per stage.

    Args:
      prompts: P captions.
      settings: one ``StageSettings`` per stage.
      num_samples: images per prompt (N = P x num_samples, prompt-major).
      seed: fixes every draw; the same seed gives the same images bit for bit.
      negative_prompts: guide away from these (one per prompt) instead of the
        null text.
      stop_after: index of the last stage to run (default: all).
      start_image: ``[P or N, h, w, 3]`` uint8 images to super-resolve,
        entering at ``start_stage`` (an SR stage) as its low-res input.
      start_stage: the stage the cascade starts at.
      start_noise_level: for a *base* start stage with ``start_image``:
        img2img from that image noised to this t in (0, 1].
      progress: a progress bar per stage (steps, steps/s).

    Returns:
      A list with one ``[N, R_i, R_i, 3]`` uint8 array per stage run.
    """
    prompts = list(prompts)
    first, last = self.validate(
        len(prompts), settings, num_samples=num_samples,
        negative_prompts=negative_prompts, stop_after=stop_after,
        start_image=start_image, start_stage=start_stage,
        start_noise_level=start_noise_level)
    batch = self.prepare(prompts, num_samples=num_samples,
                         negative_prompts=negative_prompts,
                         start_image=start_image)
    images = batch.start_image
    root = jax.random.PRNGKey(seed)
    outputs = []
    for i in range(first, last + 1):
      images = self.run_stage(i, settings[i], batch.inputs, images,
                              jax.random.fold_in(root, i),
                              start_noise_level=start_noise_level,
                              progress=progress)
      outputs.append(np.asarray(jax.device_get(images))[:batch.num_images])
    return outputs


def export_stage(workdir: str, out_dir: str, use_ema: bool = True,
                 mesh: Optional[Mesh] = None) -> str:
  """Writes a stage's (EMA) params alone, with its config, in orbax format.

  The export holds ``params/`` (orbax), ``stage.json`` (the run's config) and
  ``text_encoder.json``: no optimizer state, a fraction of a checkpoint's size.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = mesh or parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  loaded = load_stage(workdir, mesh, use_ema)
  fileio.makedirs(out_dir)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(fileio.join(fileio.abspath(out_dir), "params"), loaded.params,
             force=True)
  ckptr.wait_until_finished()
  config = json.loads(loaded.config.to_json_best_effort())
  config["exported_from"] = {"workdir": fileio.abspath(workdir),
                             "step": loaded.step, "ema": use_ema}
  fileio.write_json(os.path.join(out_dir, "stage.json"), config)
  fileio.write_json(os.path.join(out_dir, "text_encoder.json"),
                    loaded.text_encoder_spec)
  return out_dir


def float_images(x: np.ndarray) -> jax.Array:
  """uint8 images to [-1, 1] floats (for users feeding their own images)."""
  return to_float_image(jnp.asarray(x))
