"""`imagen-convert`: a DeepFloyd IF stage directory -> an export we sample from.

  imagen-convert --src=IF-I-XL-v1.0 --out=exports/if_1 [--variant=fp16]
  imagen-convert --src=IF-II-L-v1.0 --out=exports/if_2 [--variant=fp16]
  imagen-sample --stages=exports/if_1,exports/if_2 --prompt="..."

``--src`` is a stage of IF in the diffusers layout (what the model cards
publish): ``unet/config.json`` with ``unet/diffusion_pytorch_model[.fp16]
.safetensors`` (one file or shards with their ``.index.json``),
``text_encoder/`` (Hugging Face T5-v1.1-XXL, read by our T5 as is) and
``tokenizer/spiece.model``. The export (``params/``, ``stage.json``,
``text_encoder.json``) is what ``Cascade.load`` and ``config.init_from``
read; its text-encoder record points at ``--src``'s T5, so sampling finds it.
Stage III of IF (a latent x4 upscaler) is not an IF U-Net: out of scope.

Conversion streams: tensors are read one at a time from the safetensors
files and placed into the float32 tree, so host memory peaks at about the
model's float32 size (measured in benchmarks/RESULTS.md). Anything that
does not map (not an IF directory, a missing shard, an unsupported variant
or config key, an unmapped tensor) is one line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence


from imagen_jax import convert_if
from imagen_jax import fileio
from imagen_jax import host_malloc

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
  single = os.path.join(unet_dir, f"{WEIGHTS}{suffix}.safetensors")
  # diffusers puts the variant last in index names: ...index.fp16.json.
  index = os.path.join(unet_dir, f"{WEIGHTS}.safetensors.index{suffix}.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    for shard in shards:
      if not os.path.isfile(os.path.join(unet_dir, shard)):
        raise convert_if.ConvertError(
            f"{os.path.join(unet_dir, shard)} is listed in {index} but "
            "missing; download every shard.")
    return [os.path.join(unet_dir, s) for s in shards]
  if os.path.isfile(os.path.join(unet_dir, f"{WEIGHTS}{suffix}.bin")):
    raise convert_if.ConvertError(
        f"{unet_dir} has only PyTorch .bin weights for variant "
        f"{variant or 'default'!r}; download the .safetensors files.")
  found = any(".fp16" in f and f.endswith(".safetensors")
              for f in os.listdir(unet_dir))
  hint = " (it has fp16 files: try --variant=fp16)" if found and not variant else ""
  raise convert_if.ConvertError(
      f"{unet_dir} has no {os.path.basename(single)} nor "
      f"{os.path.basename(index)}{hint}.")


def stage_config(model_fields: dict[str, Any], src: str, stage_ii: bool,
                 resolution: int = 0, lowres_resolution: int = 0):
  """The full stage config of a converted IF U-Net.

  Args:
    model_fields: from ``convert_if.unet_config_to_model``.
    src: the IF directory (for the text encoder's paths).
    stage_ii: whether it is the 64 -> 256 super-resolution stage.
    resolution: output size (0: IF's, 64 for stage I and 256 for stage II).
    lowres_resolution: stage II's input size (0: IF's 64).

  Returns:
    A ``ConfigDict`` like a training run's.
  """
  from imagen_jax import config_defaults  # pylint: disable=g-import-not-at-top
  config = config_defaults.base()
  fields = dict(model_fields)
  native = fields.pop("resolution")
  for key, value in fields.items():
    config.model[key] = value
  config.model.dtype = "bfloat16"
  d = config.diffusion
  d.schedule = "discrete_cosine"
  d.aug_schedule = "discrete_cosine"
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
  t.checkpoint = fileio.abspath(fileio.join(src, "text_encoder"))
  t.vocab = fileio.abspath(fileio.join(src, "tokenizer", "spiece.model"))
  t.max_length = IF_MAX_LENGTH
  return config


def text_encoder_spec(src: str, dtype: str = "bfloat16") -> dict:
  """The text-encoder record of an IF directory, without loading T5.

  Args:
    src: the IF stage directory.
    dtype: T5 compute dtype recorded.

  Returns:
    The spec ``TextEncoder.from_hf`` would write for ``src/text_encoder``.
  """
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import t5_checkpoints  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  te = os.path.join(src, "text_encoder")
  cfg_file = os.path.join(te, "config.json")
  vocab = os.path.join(src, "tokenizer", "spiece.model")
  for path in (cfg_file, vocab):
    if not os.path.isfile(path):
      raise convert_if.ConvertError(
          f"{path} is missing: an IF directory has text_encoder/ (Hugging "
          "Face T5) and tokenizer/spiece.model.")
  with open(cfg_file) as f:
    config = t5_checkpoints.hf_config_to_t5(json.load(f), dtype)
  return dict(t5=encoder_lib._size_name(config),  # pylint: disable=protected-access
              source="hf", checkpoint=fileio.abspath(te), seed=0,
              vocab=fileio.abspath(vocab), max_length=IF_MAX_LENGTH,
              vocab_sha256=vocab_lib.vocab_sha256(vocab),
              config=config.to_dict())


def read_unet(src: str, variant: str = "") -> tuple[dict, dict]:
  """Checks an IF stage directory and reads its U-Net config.

  Returns:
    (the raw ``unet/config.json``, our model fields).
  """
  if not os.path.isdir(src):
    raise convert_if.ConvertError(f"--src {src!r} is not a directory.")
  unet_cfg = os.path.join(src, "unet", "config.json")
  if not os.path.isfile(unet_cfg):
    if os.path.isfile(os.path.join(src, "config.yml")):
      raise convert_if.ConvertError(
          f"{src} is in deepfloyd_if's own layout (config.yml + "
          "pytorch_model.bin), which we do not read; use the model card's "
          "diffusers files (unet/, text_encoder/, tokenizer/).")
    raise convert_if.ConvertError(
        f"{src} is not an IF checkpoint directory: no unet/config.json.")
  with open(unet_cfg) as f:
    raw = json.load(f)
  if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise convert_if.ConvertError(
        f"{unet_cfg} describes a {raw['_class_name']}, not IF's "
        "UNet2DConditionModel (IF's stage III is out of scope).")
  return raw, convert_if.unet_config_to_model(raw)


def convert(src: str, out: str, variant: str = "", resolution: int = 0,
            lowres_resolution: int = 0) -> str:
  """Converts one IF stage directory into an export directory.

  Args:
    src: IF stage directory (diffusers layout).
    out: export directory to write.
    variant: "" or "fp16" (which weight files to read).
    resolution, lowres_resolution: see ``stage_config``.

  Returns:
    ``out``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from imagen_jax import build  # pylint: disable=g-import-not-at-top

  _, fields = read_unet(src, variant)
  files = weight_files(os.path.join(src, "unet"), variant)
  config = stage_config(fields, src, fields["lowres_cond"], resolution,
                        lowres_resolution)
  spec = text_encoder_spec(src, str(config.text.dtype))
  if spec["config"]["d_model"] != fields["text_dim"]:
    raise convert_if.ConvertError(
        f"text_encoder/ gives {spec['config']['d_model']}-wide embeddings but "
        f"the U-Net reads {fields['text_dim']}; not one IF stage directory.")
  unet = build.build_unet(config.model)
  abstract = nn.unbox(build.param_shapes(unet, build.unet_inputs(config, 1, 4)))
  expected = {tuple(k.key for k in path): leaf.shape for path, leaf in
              jax.tree_util.tree_flatten_with_path(abstract)[0]}
  levels = len(fields["channel_mult"])

  params: dict = {}
  for name in files:
    with safe_open(name, framework="numpy") as f:
      for key in f.keys():
        path, kind = convert_if.map_key(key, levels)
        if path not in expected:
          raise convert_if.ConvertError(
              f"{os.path.basename(name)}: tensor {key!r} has no place in the "
              "U-Net its config describes.")
        value = convert_if.convert_tensor(kind, f.get_tensor(key))
        if value.shape != expected[path]:
          raise convert_if.ConvertError(
              f"{os.path.basename(name)}: tensor {key!r} has shape "
              f"{value.shape} in our layout, expected {expected[path]}.")
        node = params
        for part in path[:-1]:
          node = node.setdefault(part, {})
        node[path[-1]] = value
        del value
  got = {tuple(k.key for k in path) for path, _ in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(expected) - got)
  if missing:
    raise convert_if.ConvertError(
        f"{src}: the checkpoint has no tensor for {'/'.join(missing[0])} "
        f"({len(missing)} parameters missing); a shard or file is incomplete.")

  fileio.makedirs(out)
  # The default lets orbax stage up to 96 GB of copies at once (2.5x the
  # model's float32 size measured); 1 GB in flight keeps the peak near 1x.
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=1))
  ckptr.save(fileio.join(fileio.abspath(out), "params"),
             args=ocp.args.StandardSave(params), force=True)
  record = json.loads(config.to_json_best_effort())
  record["converted_from"] = {"src": fileio.abspath(src),
                              "variant": variant or "default",
                              "files": [os.path.basename(f) for f in files]}
  fileio.write_json(fileio.join(out, "stage.json"), record)
  fileio.write_json(fileio.join(out, "text_encoder.json"), spec)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI main; returns the exit code."""
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("--src", required=True,
                 help="IF stage directory (diffusers layout).")
  p.add_argument("--out", required=True, help="Export directory to write.")
  p.add_argument("--variant", default="", help="Weights variant: '' or fp16.")
  p.add_argument("--resolution", type=int, default=0,
                 help="Output size (default IF's: 64 stage I, 256 stage II).")
  p.add_argument("--lowres_resolution", type=int, default=0,
                 help="Stage II input size (default IF's 64).")
  p.error = lambda message: cli.fail(PROG, message)
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  cli.setup_logging_and_cache()
  try:
    out = convert(args.src, args.out, args.variant, args.resolution,
                  args.lowres_resolution)
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
