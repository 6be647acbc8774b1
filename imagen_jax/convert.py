"""`imagen-convert`: a DeepFloyd IF stage directory -> an export we sample from.

  imagen-convert --src=IF-I-XL-v1.0 --out=exports/if_1 [--variant=fp16]
  imagen-convert --src=IF-II-L-v1.0 --out=exports/if_2 [--variant=fp16] \
      --text_encoder=IF-I-XL-v1.0/text_encoder   # one T5 for the cascade
  imagen-sample --stages=exports/if_1,exports/if_2 --prompt="..."
  # deepfloyd_if's own layout (config.yml + pytorch_model.bin), no T5 in it:
  imagen-convert --src=IF-I-XL-orig --out=exports/if_1 \
      --text_encoder=IF-I-XL-v1.0/text_encoder

``--src`` is a stage of IF in the diffusers layout (what the model cards
publish): ``unet/config.json`` with ``unet/diffusion_pytorch_model[.fp16]
.safetensors`` (one file or shards with their ``.index.json``),
``text_encoder/`` (Hugging Face T5-v1.1-XXL, read by our T5 as is) and
``tokenizer/spiece.model``. The export (``params/``, ``stage.json``,
``text_encoder.json``) is what ``Cascade.load`` and ``config.init_from``
read; its text-encoder record points at ``--src``'s T5, so sampling finds it.

``--src`` may instead be in the deep-floyd/IF repository's own layout:
``config.yml`` (its U-Net's arguments under ``params``) and
``pytorch_model.bin`` (torch's zip format, read without torch by
``tensor_files``). Its config and tensor names are mapped onto diffusers'
(``convert_if.deepfloyd_*``); it holds no T5, so ``--text_encoder`` names
one (an IF diffusers directory's ``text_encoder/``).
Stage III of IF (a latent x4 upscaler) is not an IF U-Net: out of scope.

Conversion streams: every tensor is mapped and its shape checked from the
files' headers first; then orbax writes the export while each tensor is
read, converted to float32 and released in turn, a bounded window at a
time, so host memory stays near the Python/JAX baseline plus that window
whatever the model's size (measured in benchmarks/RESULTS.md). Anything
that does not map (not an IF directory, a missing shard, an unsupported
variant or config key, an unmapped tensor) is one line naming it, exit 2.

``--src``, ``--text_encoder`` and ``--out`` may be local or ``gs://`` URLs
(``imagen_jax.fileio``); a URL's tensors are read by byte range, one at a
time, like a local file's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from imagen_jax import convert_if
from imagen_jax import fileio
from imagen_jax import host_malloc
from imagen_jax import tensor_files

PROG = "imagen-convert"
VARIANTS = ("", "fp16")
WEIGHTS = "diffusion_pytorch_model"
# IF's published sampling settings per stage (its model cards and pipelines):
# guidance 7 / 4, dynamic thresholding at p = 95 capped at 1.5 / 1 (1 is
# clipping), 100 / 50 respaced ancestral steps, stage II aug step 250.
SAMPLE_DEFAULTS = {
    False: dict(sampler="ancestral", timesteps="smart100", guidance_scale=7.0,
                threshold="dynamic", percentile=95.0, threshold_max=1.5),
    True: dict(sampler="ancestral", timesteps="smart50", guidance_scale=4.0,
               threshold="dynamic", percentile=95.0, threshold_max=1.0,
               aug_level=0.25),
}
IF_MAX_LENGTH = 77   # IF's T5 token count


@contextlib.contextmanager
def _reading(path: str):
  """Turns a malformed or incomplete config file into one line naming it."""
  try:
    yield
  except convert_if.ConvertError:
    raise
  except KeyError as e:
    raise convert_if.ConvertError(
        f"{path} lacks {e.args[0]!r}; it is not a complete IF or T5 "
        "config (download it again).") from None
  except json.JSONDecodeError as e:
    raise convert_if.ConvertError(
        f"{path} is not valid JSON ({e.msg}, line {e.lineno}); download it "
        "again.") from None
  except (TypeError, ValueError, AttributeError) as e:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise convert_if.ConvertError(f"{path}: {why.rstrip('.')}.") from None


def _read_json_dict(path: str) -> dict:
  """A JSON file holding an object (one line naming the file otherwise)."""
  with _reading(path):
    value = fileio.read_json(path)
    if not isinstance(value, dict):
      raise ValueError(f"holds a JSON {type(value).__name__}, not an object")
  return value


def weight_files(unet_dir: str, variant: str = "") -> list[str]:
  """The safetensors files of a diffusers U-Net directory, checked.

  Args:
    unet_dir: the ``unet/`` directory.
    variant: "" or "fp16".

  Returns:
    Paths of the files holding the tensors (one, or every shard).

  Raises:
    convert_if.ConvertError: no such variant, a missing shard, .bin only.
  """
  if variant not in VARIANTS:
    raise convert_if.ConvertError(
        f"--variant={variant!r} is not supported; use '' or fp16.")
  suffix = f".{variant}" if variant else ""
  single = fileio.join(unet_dir, f"{WEIGHTS}{suffix}.safetensors")
  # diffusers puts the variant last in index names: ...index.fp16.json.
  index = fileio.join(unet_dir, f"{WEIGHTS}.safetensors.index{suffix}.json")
  if fileio.isfile(single):
    return [single]
  if fileio.isfile(index):
    with _reading(index):
      shards = sorted(set(_read_json_dict(index)["weight_map"].values()))
      if not all(isinstance(shard, str) for shard in shards):
        raise ValueError("its weight_map values are not file names")
    for shard in shards:
      if not fileio.isfile(fileio.join(unet_dir, shard)):
        raise convert_if.ConvertError(
            f"{fileio.join(unet_dir, shard)} is listed in {index} but "
            "missing; download every shard.")
    return [fileio.join(unet_dir, s) for s in shards]
  if fileio.isfile(fileio.join(unet_dir, f"{WEIGHTS}{suffix}.bin")):
    raise convert_if.ConvertError(
        f"{unet_dir} has only PyTorch .bin weights for variant "
        f"{variant or 'default'!r}; download the .safetensors files.")
  found = any(".fp16" in f and f.endswith(".safetensors")
              for f in fileio.listdir(unet_dir))
  hint = " (it has fp16 files: try --variant=fp16)" if found and not variant else ""
  raise convert_if.ConvertError(
      f"{unet_dir} has no {os.path.basename(single)} nor "
      f"{os.path.basename(index)}{hint}.")


def stage_config(model_fields: dict[str, Any], text_encoder: str, vocab: str,
                 stage_ii: bool, resolution: int = 0,
                 lowres_resolution: int = 0):
  """The full stage config of a converted IF U-Net.

  Args:
    model_fields: from ``convert_if.unet_config_to_model``.
    text_encoder: the Hugging Face T5 directory sampling encodes with.
    vocab: its SentencePiece model.
    stage_ii: whether it is the 64 -> 256 super-resolution stage.
    resolution: output size (0: IF's, 64 for stage I and 256 for stage II).
    lowres_resolution: stage II's input size (0: IF's 64).

  Returns:
    A ``ConfigDict`` like a training run's.
  """
  from imagen_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from imagen_jax.diffusion import discrete  # pylint: disable=g-import-not-at-top
  config = config_defaults.base()
  fields = dict(model_fields)
  native = fields.pop("resolution")
  for key, value in fields.items():
    config.model[key] = value
  config.model.dtype = "bfloat16"
  d = config.diffusion
  d.schedule = discrete.SCHEDULE_NAME
  d.aug_schedule = discrete.SCHEDULE_NAME
  d.prediction = "eps"
  for key, value in SAMPLE_DEFAULTS[stage_ii].items():
    config.sample[key] = value
  if stage_ii:
    # IF-II's sample_size is its low-res size; it makes 256 px images.
    config.resolution = resolution or 256
    config.lowres_resolution = lowres_resolution or 64
  else:
    config.resolution = resolution or native
    config.lowres_resolution = 0
  t = config.text
  t.t5 = "xxl"
  t.source = "hf"
  t.checkpoint = fileio.abspath(text_encoder)
  t.vocab = fileio.abspath(vocab)
  t.max_length = IF_MAX_LENGTH
  return config


def text_encoder_spec(text_encoder: str, vocab: str,
                      dtype: str = "bfloat16") -> dict:
  """The text-encoder record of a Hugging Face T5 directory, without loading T5.

  Args:
    text_encoder: the T5 directory (an IF directory's ``text_encoder/``).
    vocab: its SentencePiece model (``tokenizer/spiece.model``).
    dtype: T5 compute dtype recorded.

  Returns:
    The spec ``TextEncoder.from_hf`` would write for ``text_encoder``, with
    IF's "full" text conditioning.
  """
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import t5_checkpoints  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  te = text_encoder
  cfg_file = fileio.join(te, "config.json")
  for path in (cfg_file, vocab):
    if not fileio.isfile(path):
      raise convert_if.ConvertError(
          f"{path} is missing: an IF directory has text_encoder/ (Hugging "
          "Face T5) and tokenizer/spiece.model.")
  with _reading(cfg_file):
    config = t5_checkpoints.hf_config_to_t5(_read_json_dict(cfg_file), dtype)
  return dict(t5=encoder_lib._size_name(config),  # pylint: disable=protected-access
              source="hf", checkpoint=fileio.abspath(te), seed=0,
              vocab=fileio.abspath(vocab), max_length=IF_MAX_LENGTH,
              vocab_sha256=vocab_lib.vocab_sha256(vocab),
              config=config.to_dict(),
              # IF reads T5's outputs at every position, unmasked, and guides
              # against T5 of the empty caption (encoder.CONDITIONINGS).
              conditioning="full")


def read_unet(src: str, variant: str = "") -> tuple[dict, dict]:
  """Checks an IF stage directory and reads its U-Net config.

  Returns:
    (the raw ``unet/config.json``, our model fields).
  """
  if not fileio.isdir(src):
    raise convert_if.ConvertError(f"--src {src!r} is not a directory.")
  unet_cfg = fileio.join(src, "unet", "config.json")
  if not fileio.isfile(unet_cfg):
    raise convert_if.ConvertError(
        f"{src} is not an IF checkpoint directory: no unet/config.json "
        "(diffusers' layout) nor config.yml (deepfloyd_if's).")
  raw = _read_json_dict(unet_cfg)
  _refuse_latent_stage(src, raw)
  if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise convert_if.ConvertError(
        f"{unet_cfg} describes a {raw['_class_name']}, not IF's "
        "UNet2DConditionModel (IF's stage III is out of scope).")
  with _reading(unet_cfg):
    return raw, convert_if.unet_config_to_model(raw)


# The pipelines whose U-Net is an IF pixel stage (model_index.json's class).
IF_PIPELINES = ("IFPipeline", "IFSuperResolutionPipeline",
                "IFImg2ImgPipeline", "IFImg2ImgSuperResolutionPipeline",
                "IFInpaintingPipeline", "IFInpaintingSuperResolutionPipeline")


def _refuse_latent_stage(src: str, raw: dict) -> None:
  """One line for IF's stage III (the Stable Diffusion x4 upscaler) or any
  other latent-diffusion directory: its U-Net is a UNet2DConditionModel too,
  but it denoises VAE latents, which no IF stage does."""
  index = fileio.join(src, "model_index.json")
  pipeline = ""
  if fileio.isfile(index):
    pipeline = str(_read_json_dict(index).get("_class_name", ""))
  why = ""
  if pipeline and pipeline not in IF_PIPELINES:
    why = f"model_index.json names a {pipeline}"
  elif fileio.isdir(fileio.join(src, "vae")):
    why = "it has a vae/ (a latent model)"
  elif (raw.get("in_channels"), raw.get("out_channels")) == (7, 4):
    why = ("its U-Net maps 7 to 4 channels (latents + a low-res image: the "
           "x4 upscaler's shape)")
  if why:
    raise convert_if.ConvertError(
        f"{src} is not an IF pixel stage: {why}. IF's stage III is the "
        "Stable Diffusion x4 upscaler, a latent model we do not run; convert "
        "stages I and II (IF-I-*, IF-II-*) and stop the cascade at 256 px.")


# Bytes of converted tensors orbax writes at once: the converter's host
# memory beyond the Python/JAX baseline is this window plus one tensor.
WRITE_WINDOW_BYTES = 1 << 30


class LazyParam:
  """One converted parameter: shape and dtype now, values when written.

  Orbax sees a leaf with ``shape``/``dtype``/``nbytes`` (so it plans the
  checkpoint, its metadata and its byte counts) and the streaming handler
  calls ``load()`` only when the tensor's turn to be written comes.
  """

  def __init__(self, shape: Sequence[int], load: Callable[[], Any],
               name: str, dtype: Any = np.float32):
    """Describes one parameter without reading it.

    Args:
      shape: its shape in our layout.
      load: returns the converted array (reads the file).
      name: file and tensor, for messages.
      dtype: the array's dtype.
    """
    self.shape = tuple(int(n) for n in shape)
    self.dtype = np.dtype(dtype)
    self.name = name
    self._load = load

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def load(self) -> np.ndarray:
    """The converted array (read from its file now)."""
    value = self._load()
    if value.shape != self.shape or value.dtype != self.dtype:
      raise convert_if.ConvertError(
          f"{self.name}: read as {value.dtype}{list(value.shape)}, expected "
          f"{self.dtype}{list(self.shape)}.")
    return value


def _streaming_handler(window_bytes: int, progress: Callable[[int], None]):
  """An orbax TypeHandler that writes ``LazyParam``s a window at a time.

  Orbax's own NumpyHandler deep-copies every array before writing any and
  then writes them all at once (its ``save_concurrent_gb`` does not reach
  numpy leaves), which holds the converted state dict twice over. This one
  loads a group of leaves of at most ``window_bytes``, hands them to the
  NumpyHandler's writer (same tensorstore spec, so the checkpoint reads
  back like any orbax checkpoint of numpy arrays), waits for the write and
  drops them before loading the next group.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import future as ocp_future  # pylint: disable=g-import-not-at-top

  class _StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """NumpyHandler whose values are loaded group by group while writing."""

    async def serialize(self, values, infos, args=None):
      args = list(args or [ocp.SaveArgs()] * len(values))
      return [ocp_future.CommitFutureAwaitingContractedSignals(
          self._stream(list(values), list(infos), args),
          name="imagen_convert_stream")]

    async def _stream(self, values, infos, args):
      start = 0
      while start < len(values):
        stop, size = start, 0
        while stop < len(values) and (
            stop == start or size + values[stop].nbytes <= window_bytes):
          size += values[stop].nbytes
          stop += 1
        arrays = [v.load() for v in values[start:stop]]
        # A protected method of our own base class: the NumpyHandler's
        # writer, so the layout on disk is exactly orbax's.
        await self._background_serialize(  # pylint: disable=protected-access
            arrays, infos[start:stop], args[start:stop])
        del arrays
        progress(size)
        start = stop

  return _StreamingNumpyHandler(deepcopy_host_arrays=False)


def save_streaming(directory: str, params: dict,
                   window_bytes: int = WRITE_WINDOW_BYTES,
                   log: Optional[Callable[[str], None]] = None) -> None:
  """Writes a tree of ``LazyParam``s as an orbax checkpoint, in bounded memory.

  Args:
    directory: the checkpoint directory (``<export>/params``).
    params: nested dict whose leaves are ``LazyParam``.
    window_bytes: bytes of converted tensors held at once.
    log: called with progress lines (None: silent).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(params)
  total = sum(leaf.nbytes for leaf in leaves)
  done = [0, 0.0]

  def progress(nbytes: int) -> None:
    done[0] += nbytes
    if log and (done[0] >= done[1] + total / 10 or done[0] == total):
      done[1] = done[0]
      log(f"wrote {done[0] / 2**30:.2f} / {total / 2**30:.2f} GiB")

  registry = ocp.type_handlers.create_type_handler_registry(
      (LazyParam, _streaming_handler(window_bytes, progress)))
  ckptr = ocp.Checkpointer(
      ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
  ckptr.save(directory, args=ocp.args.PyTreeSave(params), force=True)


def _place(params: dict, path: tuple[str, ...], leaf: LazyParam,
           where: str) -> None:
  node = params
  for part in path[:-1]:
    node = node.setdefault(part, {})
  if path[-1] in node:
    raise convert_if.ConvertError(
        f"{where} maps onto {'/'.join(path)}, which another tensor already "
        "fills.")
  node[path[-1]] = leaf


def lazy_params(entries: Sequence[tuple[str, str, tuple, Callable]],
                expected: dict[tuple, tuple], levels: int,
                source: str) -> dict:
  """Maps diffusers-named tensors onto our tree, checked, without reading.

  Args:
    entries: (file name, diffusers tensor name, its shape in diffusers'
      layout, a function returning that array) per tensor.
    expected: our parameter path -> shape, from the model's eval_shape.
    levels: U-Net levels.
    source: the checkpoint, for the message about a missing parameter.

  Returns:
    Our nested parameter dict with ``LazyParam`` leaves, every path filled.

  Raises:
    convert_if.ConvertError: a tensor that does not map, a wrong shape, or a
      parameter no tensor fills (one line naming it).
  """
  params: dict = {}
  for fname, key, shape, read in entries:
    where = f"{fname}: tensor {key!r}"
    try:
      path, kind = convert_if.map_key(key, levels)
      shape = convert_if.converted_shape(kind, shape)
    except convert_if.ConvertError as e:
      raise convert_if.ConvertError(f"{fname}: {e}") from None
    if path not in expected:
      raise convert_if.ConvertError(
          f"{where} has no place in the U-Net its config describes.")
    if shape != tuple(expected[path]):
      raise convert_if.ConvertError(
          f"{where} has shape {shape} in our layout, expected "
          f"{tuple(expected[path])}.")
    _place(params, path, LazyParam(
        shape, functools.partial(_load_converted, kind, read), where), where)
  got = set()
  stack = [((), params)]
  while stack:
    prefix, node = stack.pop()
    for name, child in node.items():
      if isinstance(child, dict):
        stack.append((prefix + (name,), child))
      else:
        got.add(prefix + (name,))
  missing = sorted(set(expected) - got)
  if missing:
    raise convert_if.ConvertError(
        f"{source}: the checkpoint has no tensor for {'/'.join(missing[0])} "
        f"({len(missing)} parameters missing); a shard or file is incomplete.")
  return params


def _load_converted(kind: str, read: Callable[[], np.ndarray]) -> np.ndarray:
  return convert_if.convert_tensor(kind, read())


def convert(src: str, out: str, variant: str = "", resolution: int = 0,
            lowres_resolution: int = 0,
            log: Optional[Callable[[str], None]] = None,
            text_encoder: str = "", vocab: str = "") -> str:
  """Converts one IF stage directory into an export directory.

  Every tensor is mapped and its shape checked from the files' headers
  before anything is written; then each is read, converted and written in
  turn (``save_streaming``), so host memory stays near the Python/JAX
  baseline plus ``WRITE_WINDOW_BYTES`` whatever the model's size.

  Args:
    src: IF stage directory: diffusers' layout (``unet/``,
      ``text_encoder/``, ``tokenizer/``) or deepfloyd_if's (``config.yml``
      + ``pytorch_model.bin``).
    out: export directory to write.
    variant: "" or "fp16" (which diffusers weight files to read).
    resolution, lowres_resolution: see ``stage_config``.
    log: called with progress lines (None: silent).
    text_encoder: Hugging Face T5 directory ("": ``src/text_encoder``; a
      deepfloyd_if directory has none, so it needs one).
    vocab: its ``spiece.model`` ("": ``tokenizer/spiece.model`` beside the
      T5 directory, else inside it).

  Returns:
    ``out``.
  """
  if not fileio.isdir(src):
    raise convert_if.ConvertError(f"--src {src!r} is not a directory.")
  deepfloyd = (not fileio.isfile(fileio.join(src, "unet", "config.json"))
               and fileio.isfile(fileio.join(src, "config.yml")))
  if deepfloyd:
    fields, entries, files = _read_deepfloyd(src, variant)
  else:
    _, fields = read_unet(src, variant)
    files = weight_files(fileio.join(src, "unet"), variant)
    entries = []
    for name in files:
      entries += [(os.path.basename(name), key, ref.shape, ref.read)
                  for key, ref in _refs(name).items()]
  if not text_encoder:
    text_encoder = fileio.join(src, "text_encoder")
    if deepfloyd:
      raise convert_if.ConvertError(
          f"{src} is in deepfloyd_if's layout, which holds no T5: pass "
          "--text_encoder=<an IF diffusers directory>/text_encoder (or a "
          "Hugging Face T5-v1.1-XXL directory).")
  if not vocab:
    # normpath would fold a URL's "//"; a URL only loses its trailing "/".
    parent = os.path.dirname(text_encoder.rstrip("/") if fileio.is_remote(
        text_encoder) else os.path.normpath(text_encoder))
    vocab = fileio.join(parent, "tokenizer", "spiece.model")
    if not fileio.isfile(vocab) and fileio.isfile(
        fileio.join(text_encoder, "spiece.model")):
      vocab = fileio.join(text_encoder, "spiece.model")
  config = stage_config(fields, text_encoder, vocab, fields["lowres_cond"],
                        resolution, lowres_resolution)
  spec = text_encoder_spec(text_encoder, vocab, str(config.text.dtype))
  if spec["config"]["d_model"] != fields["text_dim"]:
    raise convert_if.ConvertError(
        f"{text_encoder} gives {spec['config']['d_model']}-wide embeddings "
        f"but the U-Net reads {fields['text_dim']}; not IF's T5.")
  params = lazy_params(entries, _expected_shapes(config),
                       len(fields["channel_mult"]), src)
  write_export(out, params, config, spec, {
      "src": fileio.abspath(src),
      "layout": "deepfloyd_if" if deepfloyd else "diffusers",
      "variant": variant or "default",
      "files": [os.path.basename(f) for f in files]}, log)
  return out


def _refs(path: str) -> dict[str, tensor_files.TensorRef]:
  try:
    if path.endswith(".safetensors"):
      return tensor_files.read_safetensors(path)
    return tensor_files.read_torch_zip(path)
  except tensor_files.TensorFileError as e:
    raise convert_if.ConvertError(str(e)) from None


def _expected_shapes(config) -> dict[tuple, tuple]:
  """Our parameter path -> shape for a stage config (eval_shape, no memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from imagen_jax import build  # pylint: disable=g-import-not-at-top
  unet = build.build_unet(config.model)
  abstract = nn.unbox(build.param_shapes(unet, build.unet_inputs(config, 1, 4)))
  return {tuple(k.key for k in path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(abstract)[0]}


def _read_deepfloyd(src: str, variant: str):
  """deepfloyd_if's layout: (model fields, tensor entries, weight files).

  The entries name diffusers' tensors (``lazy_params`` maps those), each
  reading its part of a deepfloyd tensor when written.
  """
  import yaml  # pylint: disable=g-import-not-at-top
  if variant:
    raise convert_if.ConvertError(
        f"--variant={variant!r} names diffusers weight files; {src} is in "
        "deepfloyd_if's layout (one pytorch_model.bin): drop --variant.")
  cfg_file = fileio.join(src, "config.yml")
  weights = fileio.join(src, "pytorch_model.bin")
  if not fileio.isfile(weights):
    raise convert_if.ConvertError(
        f"{weights} is missing: deepfloyd_if's layout is config.yml + "
        "pytorch_model.bin.")
  try:
    raw = yaml.safe_load(fileio.read_text(cfg_file))
  except yaml.YAMLError as e:
    raise convert_if.ConvertError(
        f"{cfg_file} is not YAML: {str(e).splitlines()[0]}") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
    raise convert_if.ConvertError(
        f"{cfg_file} has no 'params' mapping (deepfloyd_if's U-Net "
        "arguments).")
  refs = _refs(weights)
  stage_ii = "aug_proj.0.weight" in refs
  with _reading(cfg_file):
    cfg = convert_if.deepfloyd_config_to_diffusers(raw["params"], stage_ii)
    try:
      fields = convert_if.unet_config_to_model(cfg)
    except convert_if.ConvertError as e:
      raise convert_if.ConvertError(
          f"{cfg_file} (as diffusers' unet/config.json): {e}") from None
  prefixes = convert_if.deepfloyd_prefixes(cfg)
  head_dim = cfg["attention_head_dim"]
  name = os.path.basename(weights)
  entries = []
  for key, ref in refs.items():
    try:
      for target, part, parts in convert_if.deepfloyd_key(key, prefixes, cfg):
        shape = convert_if.deepfloyd_part_shape(ref.shape, part, parts,
                                                head_dim, key)
        entries.append((name, target, shape, functools.partial(
            _read_part, ref, part, parts, head_dim)))
    except convert_if.ConvertError as e:
      raise convert_if.ConvertError(f"{name}: {e}") from None
  return fields, entries, [weights]


def _read_part(ref: tensor_files.TensorRef, part: int, parts: int,
               head_dim: int) -> np.ndarray:
  return convert_if.deepfloyd_part(ref.read(), part, parts, head_dim)


def write_export(out: str, params: dict, config, spec: dict,
                 converted_from: dict,
                 log: Optional[Callable[[str], None]] = None) -> None:
  """Writes ``params/`` (streamed), ``stage.json`` and ``text_encoder.json``.

  Args:
    out: export directory.
    params: tree of ``LazyParam``.
    config: the stage config.
    spec: the text-encoder record.
    converted_from: recorded in ``stage.json`` under ``converted_from``.
    log: progress lines (None: silent).
  """
  fileio.makedirs(out)
  if log:
    import jax  # pylint: disable=g-import-not-at-top
    leaves = jax.tree_util.tree_leaves(params)
    log(f"{len(leaves)} tensors mapped "
        f"({sum(l.nbytes for l in leaves) / 2**30:.2f} GiB in float32); "
        "writing params/")
  save_streaming(fileio.join(fileio.abspath(out), "params"), params, log=log)
  record = json.loads(config.to_json_best_effort())
  record["converted_from"] = converted_from
  fileio.write_json(fileio.join(out, "stage.json"), record)
  fileio.write_json(fileio.join(out, "text_encoder.json"), spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI main; returns the exit code."""
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(
      prog=PROG, description=__doc__.splitlines()[0],
      epilog="Converts IF's pixel stages I (64 px) and II (64 -> 256 px). "
      "Stage III (the Stable Diffusion x4 upscaler, a latent model) is out "
      "of scope and refused.")
  p.add_argument("--src", required=True,
                 help="IF stage directory: diffusers' layout (unet/, "
                 "text_encoder/, tokenizer/) or deepfloyd_if's (config.yml + "
                 "pytorch_model.bin).")
  p.add_argument("--out", required=True, help="Export directory to write.")
  p.add_argument("--variant", default="", help="Weights variant: '' or fp16.")
  p.add_argument("--resolution", type=int, default=0,
                 help="Output size (default IF's: 64 stage I, 256 stage II).")
  p.add_argument("--lowres_resolution", type=int, default=0,
                 help="Stage II input size (default IF's 64).")
  p.add_argument("--text_encoder", default="",
                 help="Hugging Face T5 directory (default SRC/text_encoder; "
                 "required for deepfloyd_if's layout, which has none).")
  p.add_argument("--vocab", default="",
                 help="Its spiece.model (default: tokenizer/spiece.model "
                 "beside the T5 directory, else inside it).")
  p.error = lambda message: cli.fail(PROG, message)
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  cli.setup_logging_and_cache()
  try:
    out = convert(args.src, args.out, args.variant, args.resolution,
                  args.lowres_resolution,
                  log=lambda line: print(f"{PROG}: {line}", file=sys.stderr,
                                         flush=True),
                  text_encoder=args.text_encoder, vocab=args.vocab)
  except convert_if.ConvertError as e:
    cli.fail(PROG, str(e))
  print(f"{PROG}: wrote {out}")
  return 0


def run_main() -> None:
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  sys.exit(main())


if __name__ == "__main__":
  run_main()
