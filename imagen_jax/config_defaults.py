"""Every config field, declared once: default, type, range and choices.

Experiment files in configs/ call ``base()`` and change what they need; the
CLIs call ``validate`` on the loaded config before any data or compilation,
so a bad value is one line naming the field and what it accepts, and a key
declared nowhere is an error rather than a silent no-op.

Declaring a field is one line in its section, e.g. in ``MODEL``::

  kernels=Field("auto", "backend kernels", choices=("auto", "reference")),

The type is the default's (a float field takes ints too; a tuple field takes
lists and checks each item). ``min``/``max`` are inclusive bounds, ``above``
an exclusive lower bound; ``choices`` is a tuple or a function returning one
(for registries that live with their code, read when validating).

Sampling settings are the fields of ``StageSettings``; a config's ``sample``
section, ``imagen-sample``'s ``--config.FIELD`` flags and the cascade all
derive from that dataclass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import ml_collections


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default and what it accepts.

  Attributes:
    default: the default value; its type is the field's type.
    doc: what the field means (one line).
    choices: allowed values, or a function returning them.
    min: inclusive lower bound (numbers; each item of a tuple).
    max: inclusive upper bound.
    above: exclusive lower bound.
    length: exact length of a tuple field.
    syntax: for a string with a grammar of its own: a function returning
      None for a value it accepts, else what is wrong (one sentence). Empty
      strings are not passed to it.
    holds_commas: a value may contain commas, so on the command line commas
      separate stages only where the whole text is not one valid value
      (``stage_values``).
  """
  default: Any
  doc: str = ""
  choices: Union[tuple, Callable[[], tuple], None] = None
  min: Optional[float] = None
  max: Optional[float] = None
  above: Optional[float] = None
  length: Optional[int] = None
  syntax: Optional[Callable[[str], Optional[str]]] = None
  holds_commas: bool = False

  @property
  def kind(self) -> type:
    """bool, int, float, str or tuple."""
    return tuple if isinstance(self.default, (tuple, list)) else type(self.default)

  @property
  def item_kind(self) -> Optional[type]:
    """Type of a tuple field's items (that of its default's first item)."""
    if self.kind is not tuple:
      return None
    return type(self.default[0]) if len(self.default) else int

  def allowed(self) -> Optional[tuple]:
    """The allowed values (None: any value of the right type and range)."""
    if self.choices is None:
      return None
    return tuple(self.choices() if callable(self.choices) else self.choices)

  def accepts(self) -> str:
    """What the field accepts, in words (for error messages and --help)."""
    allowed = self.allowed()
    if allowed is not None:
      return "one of " + ", ".join(str(a) for a in allowed)
    bounds = []
    if self.above is not None:
      bounds.append(f"> {self.above:g}")
    if self.min is not None:
      bounds.append(f">= {self.min:g}")
    if self.max is not None:
      bounds.append(f"<= {self.max:g}")
    bound = " " + " and ".join(bounds) if bounds else ""
    if self.kind is tuple:
      n = f"{self.length} " if self.length else ""
      return f"a tuple of {n}{_NOUNS[self.item_kind]}s{bound}"
    return f"{_ARTICLE[self.kind]}{bound}"

  def problem(self, value: Any) -> Optional[str]:
    """None if ``value`` is acceptable, else why not (for the error line)."""
    if self.kind is tuple:
      if not isinstance(value, (tuple, list)):
        return "wrong type"
      if self.length is not None and len(value) != self.length:
        return "wrong length"
      items = value
      kind = self.item_kind
    else:
      items = (value,)
      kind = self.kind
    for v in items:
      if not _is_instance(v, kind):
        return "wrong type"
      allowed = self.allowed()
      if allowed is not None and v not in allowed:
        return "not a choice"
      if kind in (int, float):
        if ((self.min is not None and v < self.min) or
            (self.max is not None and v > self.max) or
            (self.above is not None and v <= self.above) or v != v):  # NaN
          return "out of range"
    if self.syntax is not None and value:
      return self.syntax(value)
    return None

  def check(self, path: str, value: Any) -> None:
    """Raises ``ConfigError`` (one line) unless ``value`` is acceptable."""
    problem = self.problem(value)
    if problem is not None:
      raise ConfigError(self._error(path, value, problem))

  def _error(self, path: str, value: Any, problem: str = "") -> str:
    if self.syntax is not None and problem and _is_instance(value, self.kind):
      return f"config.{path}={value!r} is invalid: {problem}"
    verb = "choose" if self.choices is not None else "use"
    return f"config.{path}={value!r} is invalid; {verb} {self.accepts()}."

  def parse(self, path: str, text: str) -> Any:
    """A command-line string as this field's type, checked."""
    text = text.strip()
    try:
      if self.kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
          raise ValueError(text)
        value = text.lower() in ("true", "1", "yes")
      elif self.kind is tuple:
        value = tuple(self.item_kind(t) for t in text.strip("()").split(",") if t)
      else:
        value = self.kind(text)
    except ValueError:
      raise ConfigError(self._error(path, text)) from None
    self.check(path, value)
    return value


_ARTICLE = {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}
_NOUNS = {bool: "bool", int: "integer", float: "number", str: "string"}


def _is_instance(value: Any, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


class ConfigError(ValueError):
  """A config value the schema refuses (one-line message, exit code 2)."""


# Registries that live with their code: read when a config is validated, so
# importing this module (every config file does) stays light.

def _samplers() -> tuple:
  from imagen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  return tuple(sorted(samplers.SAMPLERS))


def _thresholds() -> tuple:
  from imagen_jax.diffusion import guidance  # pylint: disable=g-import-not-at-top
  return guidance.THRESHOLDS


def _schedules() -> tuple:
  from imagen_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  return schedules.SCHEDULE_NAMES


def _predictions() -> tuple:
  from imagen_jax.diffusion import gaussian  # pylint: disable=g-import-not-at-top
  return gaussian.PREDICTIONS


def _weightings() -> tuple:
  from imagen_jax.diffusion import losses  # pylint: disable=g-import-not-at-top
  return losses.WEIGHTINGS


def _optimizers() -> tuple:
  from imagen_jax.train import optim  # pylint: disable=g-import-not-at-top
  return optim.OPTIMIZERS


def _decays() -> tuple:
  from imagen_jax.train import optim  # pylint: disable=g-import-not-at-top
  return optim.DECAYS


def _dtypes() -> tuple:
  from imagen_jax.models import unet  # pylint: disable=g-import-not-at-top
  return tuple(unet.DTYPES)


def _remat_policies() -> tuple:
  from imagen_jax.models import unet  # pylint: disable=g-import-not-at-top
  return tuple(unet.REMAT_POLICIES)


def _kernel_choices() -> tuple:
  from imagen_jax import kernels  # pylint: disable=g-import-not-at-top
  return kernels.CHOICES


def _t5_sizes() -> tuple:
  from imagen_jax.models import t5  # pylint: disable=g-import-not-at-top
  return tuple(t5.T5_SIZES)


# Where training examples come from. "synthetic": captions encoded on the fly
# (tests); the others build an embedding store first (imagen-embed).
DATA_SOURCES = ("synthetic", "tfds", "shapes", "digits", "tfrecord", "folder",
                "webdataset")
SR_TARGETS = ("image", "residual")
# Random T5 weights: "t5" (T5's own init) or "local" (see text/encoder.py).
RANDOM_INITS = ("t5", "local")
TEXT_SOURCES = ("t5x", "hf", "random")
DEMO_VARIANTS = ("shapes", "digits", "quick")


# --- sections --------------------------------------------------------------------

# U-Net settings: each is a field of ``imagen_jax.models.UNet`` of the same
# name, and ``build.build_unet`` passes them all through.
MODEL = dict(
    base_channels=Field(128, "width of level 0 (the paper's embed dim)", min=1),
    channel_mult=Field((1, 2, 4, 8), "width multiplier per level", min=1),
    num_res_blocks=Field((2, 2, 2, 2), "res blocks per level", min=1),
    self_attn=Field((False, False, False, False), "self-attention per level"),
    cross_attn=Field((False, False, False, False), "text cross-attention per level"),
    efficient=Field(False, "Efficient U-Net layout (SR stages)"),
    mid_attn=Field(True, "middle block with attention (non-efficient layout)"),
    full_res_skip=Field(False, "efficient layout: the input convolution's "
                        "features skip to the output convolution, at full "
                        "resolution"),
    head_dim=Field(64, "channels per attention head", min=1),
    ff_mult=Field(0, "MLP width multiplier in attention blocks (0: none)", min=0),
    text_dim=Field(4096, "width of the text embeddings (T5 d_model)", min=1),
    cond_dim=Field(512, "width text is projected to for cross-attention", min=1),
    text_layers=Field(0, "trainable Transformer layers (with sinusoidal "
                      "positions) over the projected text before the "
                      "U-Net reads it (0: Imagen's projection alone)", min=0),
    emb_dim=Field(0, "time/conditioning embedding width (0: 4 x base_channels)",
                  min=0),
    in_channels=Field(3, "image channels", min=1),
    lowres_cond=Field(False, "takes a low-res input (SR stages)"),
    lowres_resize=Field("bilinear", "upsampling of the low-res input",
                        choices=("bilinear", "bicubic")),
    num_groups=Field(32, "GroupNorm groups", min=1),
    dropout=Field(0.0, "dropout rate in res blocks", min=0.0, max=1.0),
    dtype=Field("bfloat16", "compute dtype; params stay float32",
                choices=_dtypes),
    remat=Field("none", "rematerialisation policy per block",
                choices=_remat_policies),
    out_channels=Field(0, "prediction channels (0: in_channels; IF: 6, eps + "
                       "learned variance)", min=0),
    family=Field("imagen", "block family: imagen | if (DeepFloyd IF's blocks)",
                 choices=("imagen", "if")),
    res_scale=Field(1.0, "IF: res block output divisor", above=0.0),
    mid_scale=Field(1.0, "IF: middle res blocks' output divisor", above=0.0),
    emb_act=Field(False, "IF-II: GELU on the summed embedding"),
    skip_time_act=Field(False, "IF-II: no GELU before res blocks' projection"),
    pool_heads=Field(64, "IF: text attention-pooling heads", min=1),
    kernels=Field("auto", "backend kernels (imagen_jax.kernels): auto is "
                  "xla_cpu on CPU, reference elsewhere",
                  choices=_kernel_choices),
)

# The frozen text encoder: which T5, whose weights, which vocabulary.
TEXT = dict(
    t5=Field("xxl", "T5 size", choices=_t5_sizes),
    source=Field("t5x", "where the weights come from", choices=TEXT_SOURCES),
    checkpoint=Field("", "t5x checkpoint dir or Hugging Face dir"),
    vocab=Field("", "SentencePiece .model (\"default\": the demo vocab)"),
    max_length=Field(128, "tokens per caption incl. EOS (the paper's 128)", min=1),
    seed=Field(0, "init seed when source is random"),
    random_init=Field("t5", "random weights: t5 | local (text/encoder.py)",
                      choices=RANDOM_INITS),
    dtype=Field("bfloat16", "encoder compute dtype", choices=_dtypes),
)

# Caption/image source and the embedding store built from it.
DATA = dict(
    source=Field("tfds", "where examples come from", choices=DATA_SOURCES),
    name=Field("coco_captions", "tfds dataset name"),
    split=Field("train", "split to train on"),
    data_dir=Field("", "tfds data dir"),
    image_key=Field("image", "image feature key"),
    caption_key=Field("captions/text", "caption feature key"),
    id_key=Field("", "example id feature key"),
    files=Field("", "glob (tfrecord, webdataset); \"split:glob,...\" allowed"),
    folder=Field("", "image folder with .txt captions"),
    num_examples=Field(0, "built-in datasets: training examples to render", min=0),
    num_test=Field(500, "shapes: test (and holdout) examples", min=0),
    render_resolution=Field(128, "built-in datasets: size they are rendered at",
                            min=1),
    render_seed=Field(0, "shapes: scene seed"),
    holdout=Field("", "shapes: \"red triangle,blue circle\" held out of train"),
    store=Field("", "embedding store dir (default: WORKDIR/embeddings)"),
    min_size=Field(0, "drop images with a smaller shorter side (0: resolution)",
                   min=0),
    flip=Field(False, "random horizontal flips (off: captions say left/right)"),
)

# The embed job: batch size, shard size, local mesh.
EMBED = dict(
    batch_size=Field(128, "captions per T5 call", min=1),
    shard_size=Field(4096, "examples per shard; a multiple of batch_size", min=1),
    mesh_shape=Field((1, -1, 1), "over this process's devices (-1: the rest)",
                     min=-1, length=3),
)

# Diffusion settings of a stage (see ``imagen_jax.stage.Stage``).
DIFFUSION = dict(
    schedule=Field("cosine", "log-SNR schedule", choices=_schedules),
    schedule_shift=Field(1.0, "resolution shift of the schedule", above=0.0),
    prediction=Field("eps", "what the network predicts", choices=_predictions),
    weighting=Field("none", "loss weighting", choices=_weightings),
    min_snr_gamma=Field(5.0, "gamma of min-SNR weighting", above=0.0),
    cond_drop_prob=Field(0.1, "null-text fraction (the paper's 10%)",
                         min=0.0, max=1.0),
    aug_schedule=Field("cosine", "schedule of noise-augmentation levels",
                       choices=_schedules),
    aug_max=Field(1.0, "SR: training aug levels ~ U[0, aug_max]", min=0.0, max=1.0),
    sr_target=Field("image", "SR: image (paper) | residual over the upsampled "
                    "input", choices=SR_TARGETS),
)

# Optimizer and learning-rate schedule.
OPTIMIZER = dict(
    name=Field("adam", "optimizer", choices=_optimizers),
    learning_rate=Field(1e-4, "peak learning rate", above=0.0),
    warmup_steps=Field(10000, "linear warmup steps", min=0),
    decay=Field("cosine", "decay after warmup", choices=_decays),
    decay_steps=Field(0, "0: total_steps - warmup_steps", min=0),
    end_lr_factor=Field(0.0, "final lr = end_lr_factor * learning_rate",
                        min=0.0, max=1.0),
    b1=Field(0.9, "first-moment decay", min=0.0, max=1.0),
    b2=Field(0.999, "second-moment decay", min=0.0, max=1.0),
    eps=Field(1e-8, "denominator epsilon", above=0.0),
    weight_decay=Field(0.0, "decoupled weight decay (adamw)", min=0.0),
    grad_clip=Field(1.0, "global-norm clip; 0 disables", min=0.0),
    grad_accum=Field(1, "micro-batches per step (one update per step)", min=1),
)

MESH = dict(
    shape=Field((-1, 1, 1), "(data, fsdp, tensor); -1 takes the rest",
                min=-1, length=3),
    dcn_shape=Field((1, 1, 1), "multi-slice: slices along each axis",
                    min=1, length=3),
    num_devices=Field(0, "single process: use the first N devices (0: all)",
                      min=0),
)

EMA = dict(
    decay=Field(0.9999, "EMA decay per step", min=0.0, max=1.0),
    warmup=Field(True, "ramp the decay up over the first steps"),
)


def setting(default: Any, doc: str, **kwargs) -> Any:
  """A ``StageSettings`` field: its default and ``Field`` given once.

  Args:
    default: the setting's default (its type is the setting's type).
    doc: what it means (one line).
    **kwargs: the rest of its ``Field`` (range, choices, syntax).

  Returns:
    A ``dataclasses.field`` whose metadata holds the ``Field``.
  """
  return dataclasses.field(default=default, metadata={
      "field": Field(default, doc, **kwargs)})


def _respacing_problem(spec: str) -> Optional[str]:
  from imagen_jax.diffusion import discrete  # pylint: disable=g-import-not-at-top
  try:
    discrete.respaced_steps(spec)
  except ValueError as e:
    return str(e)
  return None


def timesteps_problem(timesteps: str, schedule: str) -> Optional[str]:
  """None if a stage of ``schedule`` can sample with ``timesteps``, else why.

  Args:
    timesteps: the stage's ``sample.timesteps`` ("" for none).
    schedule: its ``diffusion.schedule``.

  Returns:
    None, or one sentence naming both values and the fix.
  """
  from imagen_jax.diffusion import discrete  # pylint: disable=g-import-not-at-top
  if timesteps and schedule != discrete.SCHEDULE_NAME:
    return (f"sample.timesteps={timesteps!r} respaces the "
            f"{discrete.SCHEDULE_NAME} schedule, but diffusion.schedule is "
            f"{schedule!r}; leave sample.timesteps empty (use num_steps).")
  return None


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """How one stage samples: a config's ``sample`` section, imagen-sample's
  ``--config.FIELD`` flags and ``Cascade.sample``'s settings, all from here.

  Each field's metadata holds its ``Field`` (doc, range, choices); add a
  setting by adding a line below.
  """
  sampler: str = setting("ddim", "sampling loop", choices=_samplers)
  num_steps: int = setting(50, "sampling steps (network calls per image)",
                           min=1)
  guidance_scale: float = setting(
      5.0, "classifier-free guidance weight (1: none)", min=0.0)
  threshold: str = setting("dynamic", "x0 thresholding", choices=_thresholds)
  percentile: float = setting(
      99.5, "dynamic-threshold percentile (the paper's 99.5)", above=50.0,
      max=100.0)
  aug_level: float = setting(
      0.2, "SR: noise-augmentation level of the low-res input", min=0.0,
      max=1.0)
  eta: float = setting(0.0, "DDIM stochasticity (0: deterministic)", min=0.0,
                       max=1.0)
  timesteps: str = setting(
      "", "discrete schedules: respacing, e.g. smart27, fast27, "
      "'10,10,3,2,2' or 'steps:999,500,0' (sets the steps)",
      syntax=_respacing_problem, holds_commas=True)
  threshold_max: float = setting(
      0.0, "cap of the dynamic threshold's scale (IF's c; 0: none)", min=0.0)

  @classmethod
  def fields(cls) -> dict[str, Field]:
    """Setting name -> its ``Field``."""
    return {f.name: f.metadata["field"] for f in dataclasses.fields(cls)}

  @classmethod
  def from_config(cls, sample: ml_collections.ConfigDict) -> "StageSettings":
    """The settings of a config's ``sample`` section (missing keys: default)."""
    return cls(**{name: (_typed(spec, sample[name]) if name in sample
                         else spec.default)
                  for name, spec in cls.fields().items()})

  def check(self) -> None:
    """Raises ``ConfigError`` (one line) for a value out of type or range."""
    for name, spec in self.fields().items():
      spec.check(f"sample.{name}", getattr(self, name))


# Separates stages in a command-line setting; a comma does too, for settings
# whose values hold no commas ("50,25") and where a value's text is not one
# valid value of its own ("smart27,smart50").
STAGE_SEPARATOR = ";"


def stage_values(name: str, text: str) -> list[str]:
  """A sampling setting's command-line text split into its stage values.

  Args:
    name: the setting (a ``StageSettings`` field).
    text: e.g. "50" (every stage), "50,25" or "50;25" (one per stage);
      an empty part leaves that stage's own value.

  Returns:
    One string, for every stage, or one per stage (unparsed).
  """
  if STAGE_SEPARATOR in text:
    return text.split(STAGE_SEPARATOR)
  if "," not in text:
    return [text]
  spec = StageSettings.fields()[name]
  if spec.holds_commas:
    try:
      spec.parse(name, text)
      return [text]
    except ConfigError:
      pass
  return text.split(",")


def _typed(spec: Field, value: Any) -> Any:
  """``value`` as the field's Python type (tuples from lists; ints as floats)."""
  if spec.kind is tuple:
    return tuple(value)
  if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def sample_schema(settings_cls: type = None) -> dict[str, Field]:
  """The ``sample`` section's fields: those of ``StageSettings``."""
  return (settings_cls or StageSettings).fields()


def stage_schema() -> dict:
  """The schema of a stage config: field name -> ``Field`` or a sub-section."""
  return dict(
      seed=Field(0, "root seed of the run"),
      total_steps=Field(100000, "training steps", min=1),
      batch_size=Field(64, "global batch, over all processes", min=1),
      log_every=Field(100, "steps between log lines", min=1),
      checkpoint_every=Field(1000, "steps between checkpoints", min=1),
      keep_checkpoints=Field(3, "orbax max_to_keep", min=1),
      keep_period=Field(0, "also keep every N-th step forever (0: off)", min=0),
      async_checkpoints=Field(True, "write checkpoints in the background"),
      checkpoint_snapshot=Field(
          "auto", "on-device copy of the state at saves, so the loop does "
          "not wait for the host copy (auto: where it fits beside the step)",
          choices=("auto", "always", "never")),
      sample_every=Field(5000, "steps between sample grids (0: off)", min=0),
      num_samples=Field(8, "images in a sample grid", min=1),
      init_from=Field("", "params (EMA) of another run to start from"),
      max_consecutive_skips=Field(20, "non-finite steps in a row before "
                                  "stopping", min=1),
      peak_flops=Field(0.0, "per device, for MFU (0: table / measured)", min=0.0),
      loss_buckets=Field(4, "per-noise-level loss, in t buckets", min=1),
      prefetch=Field(2, "host batches prepared ahead", min=0),
      mesh=MESH,
      ema=EMA,
      diffusion=DIFFUSION,
      optimizer=OPTIMIZER,
      sample=sample_schema(),
      # Stage geometry: the image size the stage produces, the size of its
      # low-res input (0 for the base stage) and, for stages trained on
      # crops (Imagen's 1024 stage: 256 crops of the 1024 image), the crop.
      resolution=Field(64, "output image size", min=1),
      lowres_resolution=Field(0, "low-res input size (0: base stage)", min=0),
      train_crop=Field(0, "training crop size (0: whole images)", min=0),
      model=MODEL,
      text=TEXT,
      data=DATA,
      embed=EMBED,
  )


def demo_schema() -> dict:
  """The schema of the demo's two-stage config (``imagen_jax/demo_config.py``)."""
  return dict(
      variant=Field("shapes", "which demo", choices=DEMO_VARIANTS),
      text=TEXT,
      data=DATA,
      embed=EMBED,
      base=stage_schema(),
      sr=stage_schema(),
      eval=dict(
          seed=Field(0, "sampling seed of the evaluation"),
          per_category=Field(24, "prompts per suite category (or per digit)",
                             min=1),
          num_samples=Field(1, "images per prompt", min=1),
          batch_size=Field(64, "prompts sampled at once", min=1),
      ),
  )


def schema_for(config: ml_collections.ConfigDict) -> dict:
  """The schema a loaded config follows: the demo's or a stage's."""
  return demo_schema() if "sr" in config and "base" in config else stage_schema()


def defaults(schema: dict) -> ml_collections.ConfigDict:
  """A ConfigDict holding every field's default."""
  return ml_collections.ConfigDict({
      name: defaults(spec) if isinstance(spec, dict) else spec.default
      for name, spec in schema.items()})


def validate(config: Union[ml_collections.ConfigDict, dict],
             schema: Optional[dict] = None, prefix: str = "") -> None:
  """Checks every field's type, range and choices, and that no key is unknown.

  A stage's config (a section with ``sample`` and ``diffusion``) is also
  checked as a whole: ``sample.timesteps`` needs the schedule it respaces.

  Args:
    config: a loaded config (or a section of one, with ``prefix``); a
      ConfigDict or the nested dicts of one (e.g. read from JSON).
    schema: its schema (default: ``schema_for(config)``).
    prefix: dotted path of ``config`` inside the whole config.

  Raises:
    ConfigError: one line naming the first bad field and what it accepts.
  """
  schema = schema_for(config) if schema is None else schema
  for key in config.keys():
    if key not in schema:
      raise ConfigError(
          f"config.{prefix}{key} is not a known field; the fields of "
          f"config{'.' + prefix[:-1] if prefix else ''} are "
          f"{', '.join(schema)} (declare new ones in "
          "imagen_jax/config_defaults.py).")
  for name, spec in schema.items():
    path = prefix + name
    if name not in config:
      raise ConfigError(f"config.{path} is missing; build configs from "
                        "imagen_jax.config_defaults.base().")
    value = config[name]
    if isinstance(spec, dict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config.{path}={value!r} is invalid: {path} is a "
                          f"section with fields {', '.join(spec)}.")
      validate(value, spec, path + ".")
    else:
      spec.check(path, value)
  if "sample" in schema and "diffusion" in schema:  # a stage's config
    problem = timesteps_problem(config["sample"]["timesteps"],
                                config["diffusion"]["schedule"])
    if problem:
      raise ConfigError(f"config.{prefix}{problem}")


def model_defaults() -> ml_collections.ConfigDict:
  """U-Net settings (fields of ``imagen_jax.models.UNet``)."""
  return defaults(MODEL)


def text_defaults() -> ml_collections.ConfigDict:
  """Frozen text encoder: which T5, whose weights, which vocabulary."""
  return defaults(TEXT)


def data_defaults() -> ml_collections.ConfigDict:
  """Caption/image source and the embedding store built from it."""
  return defaults(DATA)


def embed_defaults() -> ml_collections.ConfigDict:
  """The embed job: batch size, shard size, local mesh."""
  return defaults(EMBED)


def diffusion_defaults() -> ml_collections.ConfigDict:
  """Diffusion settings of a stage (see ``imagen_jax.stage.Stage``)."""
  return defaults(DIFFUSION)


def optimizer_defaults() -> ml_collections.ConfigDict:
  """Optimizer and learning-rate schedule."""
  return defaults(OPTIMIZER)


def sample_defaults() -> ml_collections.ConfigDict:
  """Sampling settings: periodic samples in training, and the cascade."""
  return defaults(sample_schema())


def base() -> ml_collections.ConfigDict:
  """Defaults shared by every stage and experiment."""
  return defaults(stage_schema())


def use_tiny_unet(config: ml_collections.ConfigDict,
                  num_res_blocks: tuple = (1, 1)) -> None:
  """A ~0.1-0.2M-param U-Net (2 levels, attention at the lower one) for tests.

  Float32 compute and 32-wide text input: pair it with the "tiny" T5.
  """
  m = config.model
  m.base_channels = 16
  m.channel_mult = (1, 2)
  m.num_res_blocks = tuple(num_res_blocks)
  m.self_attn = (False, True)
  m.cross_attn = (False, True)
  m.head_dim = 16
  m.text_dim = 32
  m.cond_dim = 32
  m.num_groups = 8
  m.dtype = "float32"


def use_random_t5(config: ml_collections.ConfigDict, size: str,
                  max_length: int) -> None:
  """Points ``config.text`` at a random-weight T5 with the demo vocabulary.

  For CPU-scale and test variants: nothing is downloaded, and the weights are
  a pure function of ``config.text.seed``.
  """
  config.text.t5 = size
  config.text.source = "random"
  config.text.vocab = "default"
  config.text.max_length = max_length
  config.text.dtype = "float32"


def use_paper_training(config: ml_collections.ConfigDict, optimizer: str,
                       fsdp: int) -> None:
  """Imagen's training recipe (App. F) on a TPU pod slice.

  Batch 2048, lr 1e-4 with 10k linear warmup steps and cosine decay over
  2.5M steps, EMA 0.9999; Adafactor for the base stage, Adam (0.9, 0.999,
  1e-8) for the super-resolution stages. Frozen T5-XXL from its t5x
  checkpoint. Params and optimizer state are FSDP-sharded ``fsdp`` ways.
  """
  config.total_steps = 2_500_000
  config.batch_size = 2048
  config.log_every = 100
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.keep_period = 100_000
  config.sample_every = 20_000
  config.mesh.shape = (-1, fsdp, 1)
  o = config.optimizer
  o.name = optimizer
  o.learning_rate = 1e-4
  o.warmup_steps = 10_000
  o.decay = "cosine"
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.grad_clip = 1.0
  config.ema.decay = 0.9999
  config.model.dtype = "bfloat16"
  t = config.text
  t.t5 = "xxl"
  t.source = "t5x"
  t.checkpoint = "gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000"
  t.vocab = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
  t.max_length = 128
  t.dtype = "bfloat16"
  config.embed.batch_size = 1024
  config.embed.shard_size = 65536


def use_cpu_training(config: ml_collections.ConfigDict, steps: int,
                     batch: int, lr: float) -> None:
  """Training settings that fit a 2-core CPU (benchmarks, the demo)."""
  config.total_steps = steps
  config.batch_size = batch
  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.sample_every = 0
  config.mesh.shape = (-1, 1, 1)
  o = config.optimizer
  o.name = "adam"
  o.learning_rate = lr
  o.warmup_steps = max(steps // 20, 1)
  o.decay = "cosine"
  o.end_lr_factor = 0.1
  config.ema.decay = 0.995
  config.embed.batch_size = 64
  config.embed.shard_size = 1024
