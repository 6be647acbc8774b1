"""DeepFloyd IF checkpoints -> our ``UNet(family="if")``: config and key mapping.

Reads the diffusers layout of an IF stage directory::

  model_index.json            (optional; names the pipeline)
  unet/config.json            UNet2DConditionModel config
  unet/diffusion_pytorch_model[.fp16].safetensors
  unet/diffusion_pytorch_model[.fp16].safetensors.index.json + shards
  text_encoder/               Hugging Face T5 (our encoder reads it as is)

``unet_config_to_model`` turns ``unet/config.json`` into our ``config.model``
fields and refuses, naming the key, anything it does not map;
``map_key`` sends each diffusers tensor name to its place in our parameter
tree (``convert_tensor`` transposes it), so conversion streams tensor by
tensor. The command line (``imagen-convert``) lives in ``imagen_jax.convert``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np


class ConvertError(ValueError):
  """A checkpoint we cannot convert faithfully (one line for the user)."""


# diffusers config keys whose value we check but that set nothing of ours:
# key -> accepted values.
_FIXED = {
    "act_fn": ("gelu",),
    "resnet_time_scale_shift": ("scale_shift",),
    "cross_attention_norm": ("group_norm",),
    "mid_block_type": ("UNetMidBlock2DSimpleCrossAttn",),
    "addition_embed_type": ("text",),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "use_linear_projection": (False,),
    "encoder_hid_dim_type": (None, "text_proj"),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "dual_cross_attention": (False,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",),
    "addition_time_embed_dim": (None,),
    "num_attention_heads": (None,),
    "norm_eps": (1e-5,),
    "class_embed_type": (None, "timestep"),
    "time_embedding_act_fn": (None, "gelu"),
    "mid_block_only_cross_attention": (None, True, False),
    "upcast_attention": (False, True),   # float32 softmax here either way
    "dropout": None,                      # any value; inference ignores it
    "sample_size": None,
}
# Keys read below.
_READ = ("block_out_channels", "layers_per_block", "down_block_types",
         "up_block_types", "only_cross_attention", "attention_head_dim",
         "cross_attention_dim", "encoder_hid_dim", "in_channels",
         "out_channels", "time_embedding_dim", "resnet_skip_time_act",
         "resnet_out_scale_factor", "mid_block_scale_factor",
         "addition_embed_type_num_heads", "norm_num_groups")

_DOWN = {"SimpleCrossAttnDownBlock2D": True, "ResnetDownsampleBlock2D": False}
_UP = {"SimpleCrossAttnUpBlock2D": True, "ResnetUpsampleBlock2D": False}


def _per_level(value, levels: int, key: str) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      raise ConvertError(f"unet/config.json: {key} has {len(value)} entries "
                         f"for {levels} levels.")
    return list(value)
  return [value] * levels


def unet_config_to_model(cfg: dict[str, Any]) -> dict[str, Any]:
  """Our ``config.model`` fields (and resolution) for a diffusers IF config.

  Args:
    cfg: the parsed ``unet/config.json``.

  Returns:
    A dict of ``config.model`` field values plus ``"resolution"``.

  Raises:
    ConvertError: a key or value we do not map (the message names it).
  """
  for key, value in cfg.items():
    if key.startswith("_") or key in _READ:
      continue
    if key not in _FIXED:
      raise ConvertError(f"unet/config.json key {key!r} is not one we map; "
                         "this converter reads DeepFloyd IF stage I/II U-Nets.")
    allowed = _FIXED[key]
    if allowed is not None and value not in allowed and not (
        key == "transformer_layers_per_block" and isinstance(value, list)
        and set(value) == {1}):
      raise ConvertError(f"unet/config.json {key}={value!r} is not supported "
                         f"(we map {', '.join(map(repr, allowed))}).")
  missing = [k for k in ("block_out_channels", "down_block_types",
                         "up_block_types", "encoder_hid_dim",
                         "cross_attention_dim") if cfg.get(k) is None]
  if missing:
    raise ConvertError(f"unet/config.json lacks {missing[0]!r}; not an IF "
                       "stage I/II U-Net.")
  widths = list(cfg["block_out_channels"])
  levels = len(widths)
  base = widths[0]
  if any(w % base for w in widths):
    raise ConvertError(f"unet/config.json block_out_channels={widths} are not "
                       "multiples of the first; our U-Net needs that.")
  down = list(cfg["down_block_types"])
  up = list(cfg["up_block_types"])
  for name in down + up:
    if name not in _DOWN and name not in _UP:
      raise ConvertError(f"unet/config.json block type {name!r} is not one "
                         "of IF's (SimpleCrossAttn*/Resnet*sample*Block2D).")
  attn = [_DOWN.get(n) for n in down]
  if None in attn or len(up) != levels or [
      _UP.get(n) for n in reversed(up)] != attn:
    raise ConvertError("unet/config.json up_block_types do not mirror "
                       "down_block_types; our U-Net needs them to.")
  only_cross = [bool(v) for v in _per_level(
      cfg.get("only_cross_attention", False), levels, "only_cross_attention")]
  mid_only = cfg.get("mid_block_only_cross_attention")
  if mid_only is None:
    mid_only = (only_cross[-1] if not isinstance(
        cfg.get("only_cross_attention"), (list, tuple)) else False)
  if bool(mid_only) != only_cross[-1]:
    raise ConvertError("unet/config.json mid_block_only_cross_attention "
                       "differs from the lowest level's only_cross_attention;"
                       " not mapped.")
  heads = _per_level(cfg.get("attention_head_dim", 64), levels,
                     "attention_head_dim")
  if len(set(heads)) != 1:
    raise ConvertError(f"unet/config.json attention_head_dim={heads} varies "
                       "per level; not mapped.")
  in_ch = int(cfg.get("in_channels", 3))
  lowres = cfg.get("class_embed_type") == "timestep"
  if lowres:
    if in_ch % 2:
      raise ConvertError(f"unet/config.json in_channels={in_ch} is odd for a "
                         "super-resolution U-Net (image + low-res).")
    in_ch //= 2
  groups = int(cfg.get("norm_num_groups", 32))
  return dict(
      family="if",
      base_channels=base,
      channel_mult=tuple(w // base for w in widths),
      num_res_blocks=tuple(int(n) for n in _per_level(
          cfg.get("layers_per_block", 2), levels, "layers_per_block")),
      self_attn=tuple(not o for o in only_cross),
      cross_attn=tuple(attn),
      efficient=False,
      mid_attn=True,
      head_dim=int(heads[0]),
      ff_mult=0,
      text_dim=int(cfg["encoder_hid_dim"]),
      cond_dim=int(cfg["cross_attention_dim"]),
      emb_dim=int(cfg.get("time_embedding_dim") or 0),
      in_channels=in_ch,
      out_channels=int(cfg.get("out_channels", in_ch)),
      lowres_cond=lowres,
      num_groups=groups,
      res_scale=float(cfg.get("resnet_out_scale_factor", 1.0)),
      mid_scale=float(cfg.get("mid_block_scale_factor", 1.0)),
      emb_act=cfg.get("time_embedding_act_fn") == "gelu",
      skip_time_act=bool(cfg.get("resnet_skip_time_act", False)),
      pool_heads=int(cfg.get("addition_embed_type_num_heads", 64)),
      resolution=int(cfg.get("sample_size") or 64),
  )


_RES = {"norm1": "norm_0", "conv1": "conv_0", "time_emb_proj": "film",
        "norm2": "norm_1", "conv2": "conv_1", "conv_shortcut": "skip"}
_ATTN = {"group_norm": "norm", "norm_cross": "norm_text", "to_q": "query",
         "to_k": "key", "to_v": "value", "add_k_proj": "text_key",
         "add_v_proj": "text_value", "to_out.0": "out"}
_TOP = {
    "time_embedding.linear_1": ("time_mlp", "dense_0"),
    "time_embedding.linear_2": ("time_mlp", "dense_1"),
    "class_embedding.linear_1": ("aug_mlp", "dense_0"),
    "class_embedding.linear_2": ("aug_mlp", "dense_1"),
    "add_embedding.norm1": ("text_pool", "norm_in"),
    "add_embedding.pool.q_proj": ("text_pool", "query"),
    "add_embedding.pool.k_proj": ("text_pool", "key"),
    "add_embedding.pool.v_proj": ("text_pool", "value"),
    "add_embedding.proj": ("text_pool", "proj"),
    "add_embedding.norm2": ("text_pool", "norm_out"),
    "encoder_hid_proj": ("text_proj",),
    "conv_in": ("conv_in",),
    "conv_norm_out": ("norm_out",),
    "conv_out": ("conv_out",),
}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers"
                    r"|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _leaf(module: tuple, sub: str, key: str, table: dict) -> tuple:
  """Splits "norm1.weight" into our (…, "norm_0", "scale") path."""
  name, _, param = sub.rpartition(".")
  if name not in table or param not in ("weight", "bias"):
    raise ConvertError(f"checkpoint tensor {key!r} is not one we map.")
  return module + (table[name], param)


def map_key(key: str, levels: int) -> tuple[tuple[str, ...], str]:
  """Our parameter path and the tensor's kind for one diffusers tensor name.

  Args:
    key: e.g. "down_blocks.1.attentions.0.to_q.weight".
    levels: number of U-Net levels (up block u is our level levels-1-u).

  Returns:
    (path, kind): path like ("down_1_attn_0", "query", "kernel"); kind is
    "dense", "conv", "vector" or "position" (how ``convert_tensor`` reshapes).

  Raises:
    ConvertError: naming a tensor we do not map.
  """
  if key == "add_embedding.pool.positional_embedding":
    return ("text_pool", "position"), "position"
  m = _BLOCK.match(key)
  mid = _MID.match(key)
  if m:
    side, block, kind, idx, sub = m.groups()
    level = int(block) if side == "down" else levels - 1 - int(block)
    if kind in ("downsamplers", "upsamplers"):
      if idx != "0":
        raise ConvertError(f"checkpoint tensor {key!r} is not one we map.")
      path = _leaf((f"{side}_{level}_resample",), sub, key, _RES)
    elif kind == "resnets":
      path = _leaf((f"{side}_{level}_res_{idx}",), sub, key, _RES)
    else:
      path = _leaf((f"{side}_{level}_attn_{idx}",), sub, key, _ATTN)
  elif mid:
    kind, idx, sub = mid.groups()
    if kind == "resnets":
      path = _leaf((f"mid_res_{idx}",), sub, key, _RES)
    elif idx == "0":
      path = _leaf(("mid_attn",), sub, key, _ATTN)
    else:
      raise ConvertError(f"checkpoint tensor {key!r} is not one we map.")
  else:
    name, _, param = key.rpartition(".")
    if name not in _TOP or param not in ("weight", "bias"):
      raise ConvertError(f"checkpoint tensor {key!r} is not one we map.")
    path = _TOP[name] + (param,)
  # torch names -> flax names, and the reshape that goes with them.
  module, param = path[:-1], path[-1]
  is_conv = module[-1] in ("conv_0", "conv_1", "skip", "conv_in", "conv_out")
  is_norm = module[-1].startswith("norm")
  if param == "bias":
    return module + ("bias",), "vector"
  if is_norm:
    return module + ("scale",), "vector"
  return module + ("kernel",), "conv" if is_conv else "dense"


def convert_tensor(kind: str, value: np.ndarray, dtype=np.float32
                   ) -> np.ndarray:
  """Reshapes one diffusers tensor into our layout (and casts it).

  Args:
    kind: from ``map_key``.
    value: the torch-layout array.
    dtype: output dtype (float32 keeps fp16 checkpoints exact).

  Returns:
    The array in our layout.
  """
  value = np.asarray(value)
  if kind == "dense":
    value = value.T                        # [out, in] -> [in, out]
  elif kind == "conv":
    value = value.transpose(2, 3, 1, 0)    # [O, I, kh, kw] -> [kh, kw, I, O]
  return np.ascontiguousarray(value, dtype=dtype)


def converted_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape ``convert_tensor`` gives a tensor of ``shape`` (no data).

  Args:
    kind: from ``map_key``.
    shape: the torch-layout shape.

  Returns:
    The shape in our layout.
  """
  shape = tuple(shape)
  if kind == "dense" and len(shape) == 2:
    return shape[::-1]
  if kind == "conv" and len(shape) == 4:
    return tuple(shape[i] for i in (2, 3, 1, 0))
  if kind in ("dense", "conv"):
    raise ConvertError(f"a {kind} tensor of shape {shape} has the wrong rank.")
  return shape


def convert_state_dict(state: dict[str, np.ndarray], levels: int) -> dict:
  """Converts a whole in-memory state dict (tests; the CLI streams instead).

  Args:
    state: diffusers tensor name -> array.
    levels: U-Net levels.

  Returns:
    Our nested parameter dict.
  """
  params: dict = {}
  for key, value in state.items():
    path, kind = map_key(key, levels)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    if path[-1] in node:
      raise ConvertError(f"checkpoint tensor {key!r} maps onto a parameter "
                         "already filled.")
    node[path[-1]] = convert_tensor(kind, value)
  return params


_IF_COMMON = dict(
    _class_name="UNet2DConditionModel", act_fn="gelu",
    addition_embed_type="text", addition_embed_type_num_heads=64,
    attention_head_dim=64, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift",
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=4096,
    norm_num_groups=32, out_channels=6)

# IF-I-XL (4.3B) and IF-II-L (1.2B) in diffusers' config format. Reconstructed
# from the published parameter counts and diffusers' scripts/convert_if.py
# (IF's ADM settings: 64 channels per head, scale-shift norm, res-block
# resampling; stage II: aug-step class embedding, GELU'd embedding, 1/0.7071
# residual scaling, cross-attention only), not copied from the model cards'
# unet/config.json; a converted checkpoint brings its own config.json.
IF_CONFIGS = {
    "IF-I-XL": dict(
        _IF_COMMON, sample_size=64, in_channels=3,
        block_out_channels=(704, 1408, 2112, 2816), layers_per_block=3,
        cross_attention_dim=2816,
        down_block_types=("ResnetDownsampleBlock2D",)
        + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3
        + ("ResnetUpsampleBlock2D",)),
    "IF-II-L": dict(
        _IF_COMMON, sample_size=64, in_channels=6,
        block_out_channels=(128, 256, 512, 1024, 1280),
        layers_per_block=(2, 3, 4, 5, 5), cross_attention_dim=1280,
        time_embedding_dim=1280, class_embed_type="timestep",
        time_embedding_act_fn="gelu", resnet_skip_time_act=True,
        resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071,
        only_cross_attention=True,
        down_block_types=("ResnetDownsampleBlock2D",) * 3
        + ("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 2
        + ("ResnetUpsampleBlock2D",) * 3),
}


# deepfloyd_if's own layout (the deep-floyd/IF repository's checkpoints):
# ``config.yml`` whose ``params`` are the keyword arguments of its
# ``UNetModel`` (stage I) or ``SuperResUNetModel`` (stage II), and
# ``pytorch_model.bin``, a torch.save'd state dict in that model's names.
# Both are mapped onto diffusers' config and tensor names, which the rest of
# this module already maps onto ours.

# config.yml params that set nothing we map when they hold these values
# (None: any value).
_DF_FIXED = {
    "activation": ("gelu",),   # gelu_jit is the tanh approximation
    "dims": (2,),
    "num_classes": (None,),
    "use_scale_shift_norm": (True,),
    "resblock_updown": (True,),
    "interpolate_mode": ("bilinear",),
    "conv_resample": None,      # unused with res-block resampling
    "dropout": None,
    "precision": None,          # the stored dtype; read as it is
    "num_heads": None,          # num_head_channels overrides it
    "num_heads_upsample": None,
}
_DF_READ = ("in_channels", "model_channels", "out_channels", "num_res_blocks",
            "attention_resolutions", "encoder_dim", "att_pool_heads",
            "encoder_channels", "image_size", "disable_self_attentions",
            "channel_mult", "num_head_channels", "efficient_activation",
            "scale_skip_connection")
_DF_REQUIRED = ("in_channels", "model_channels", "out_channels",
                "num_res_blocks", "attention_resolutions", "encoder_dim",
                "att_pool_heads", "encoder_channels", "image_size")
# deepfloyd's ResBlock and AttentionBlock parameter names -> diffusers'.
_DF_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1",
           "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_DF_ATTN = {"norm": "group_norm", "norm_encoder": "norm_cross",
            "proj_out": "to_out.0"}
_DF_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "aug_proj.0": "class_embedding.linear_1",
    "aug_proj.2": "class_embedding.linear_2",
    "encoder_proj": "encoder_hid_proj",
    "encoder_pooling.0": "add_embedding.norm1",
    "encoder_pooling.1.q_proj": "add_embedding.pool.q_proj",
    "encoder_pooling.1.k_proj": "add_embedding.pool.k_proj",
    "encoder_pooling.1.v_proj": "add_embedding.pool.v_proj",
    "encoder_pooling.2": "add_embedding.proj",
    "encoder_pooling.3": "add_embedding.norm2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _df_list(value, what: str) -> list[int]:
  if isinstance(value, str):
    return [int(v) for v in value.split(",") if v.strip()]
  if isinstance(value, (list, tuple)):
    return [int(v) for v in value]
  if isinstance(value, int) and not isinstance(value, bool):
    return [value]
  raise ConvertError(f"config.yml {what}={value!r} is not a list of ints.")


def _df_downsample_rates(value, image_size: int, what: str) -> set[int]:
  """Resolutions as config.yml writes them -> downsampling rates (ds)."""
  if isinstance(value, str):
    return {image_size // r for r in _df_list(value, what)}
  return set(_df_list(value, what))


def deepfloyd_config_to_diffusers(params: dict[str, Any],
                                  stage_ii: bool) -> dict[str, Any]:
  """A deepfloyd_if ``config.yml``'s ``params`` as a diffusers U-Net config.

  Args:
    params: ``config.yml``'s ``params`` (its U-Net's keyword arguments).
    stage_ii: the checkpoint is a super-resolution U-Net (it has
      ``aug_proj`` tensors).

  Returns:
    The ``unet/config.json`` diffusers would write for the same network;
    ``unet_config_to_model`` maps it on.

  Raises:
    ConvertError: a key or value we do not map (the message names it).
  """
  for key, value in params.items():
    if key in _DF_READ:
      continue
    if key not in _DF_FIXED:
      raise ConvertError(f"config.yml params key {key!r} is not one we map; "
                         "this converter reads DeepFloyd IF stage I/II "
                         "U-Nets.")
    allowed = _DF_FIXED[key]
    if allowed is not None and value not in allowed:
      raise ConvertError(f"config.yml {key}={value!r} is not supported (we "
                         f"map {', '.join(map(repr, allowed))}).")
  for key in _DF_REQUIRED:
    if params.get(key) is None:
      raise ConvertError(f"config.yml params lacks {key!r}; not an IF stage "
                         "I/II U-Net config.")
  head = int(params.get("num_head_channels", -1))
  if head <= 0:
    raise ConvertError(f"config.yml num_head_channels={head}: a fixed head "
                       "count gives each level its own head width; not "
                       "mapped.")
  mult = _df_list(params.get("channel_mult", "1,2,4,8"), "channel_mult")
  levels = len(mult)
  size = int(params["image_size"])
  attn = _df_downsample_rates(params["attention_resolutions"], size,
                              "attention_resolutions")
  disable = params.get("disable_self_attentions")
  if not disable:
    no_self = set()
  elif disable is True:
    # deepfloyd_if keeps the raw attention_resolutions argument here: a list
    # of rates disables those levels' self-attention, but a string's
    # characters never equal a rate, so every level keeps its self-attention.
    raw = params["attention_resolutions"]
    no_self = set() if isinstance(raw, str) else set(attn)
  else:
    no_self = _df_downsample_rates(disable, size, "disable_self_attentions")
  has_attn = [2 ** level in attn for level in range(levels)]
  width = int(params["model_channels"])
  blocks = params["num_res_blocks"]
  blocks = (int(blocks) if isinstance(blocks, int)
            else _df_list(blocks, "num_res_blocks"))
  cfg = dict(
      _class_name="UNet2DConditionModel", act_fn="gelu",
      resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
      mid_block_type="UNetMidBlock2DSimpleCrossAttn",
      addition_embed_type="text",
      addition_embed_type_num_heads=int(params["att_pool_heads"]),
      attention_head_dim=head, norm_num_groups=32,
      sample_size=size,
      in_channels=int(params["in_channels"]),
      out_channels=int(params["out_channels"]),
      block_out_channels=[width * m for m in mult],
      layers_per_block=blocks,
      time_embedding_dim=width * max(mult),
      cross_attention_dim=int(params["encoder_channels"]),
      encoder_hid_dim=int(params["encoder_dim"]),
      down_block_types=["SimpleCrossAttnDownBlock2D" if a else
                        "ResnetDownsampleBlock2D" for a in has_attn],
      up_block_types=["SimpleCrossAttnUpBlock2D" if a else
                      "ResnetUpsampleBlock2D" for a in reversed(has_attn)],
      only_cross_attention=[2 ** level in no_self for level in range(levels)],
      mid_block_only_cross_attention=2 ** (levels - 1) in no_self,
  )
  if cfg["cross_attention_dim"] == cfg["encoder_hid_dim"]:
    raise ConvertError("config.yml encoder_dim equals encoder_channels: that "
                       "U-Net has no text projection; not mapped.")
  if params.get("efficient_activation"):
    cfg.update(time_embedding_act_fn="gelu", resnet_skip_time_act=True)
  if params.get("scale_skip_connection"):
    cfg.update(resnet_out_scale_factor=1 / 0.7071,
               mid_block_scale_factor=1 / 0.7071)
  if stage_ii:
    cfg["class_embed_type"] = "timestep"
  return cfg


def deepfloyd_prefixes(cfg: dict[str, Any]) -> dict[str, str]:
  """deepfloyd_if module prefixes -> diffusers ones, for one U-Net config.

  Args:
    cfg: from ``deepfloyd_config_to_diffusers``.

  Returns:
    E.g. "input_blocks.5.1" -> "down_blocks.1.attentions.0": deepfloyd
    numbers its blocks in one sequence per side (a res block with its
    attention, then the resampling res block closing a level).
  """
  levels = len(cfg["block_out_channels"])
  blocks = _per_level(cfg["layers_per_block"], levels, "num_res_blocks")
  attn = [t.startswith("SimpleCrossAttn") for t in cfg["down_block_types"]]
  table = {"middle_block.0": "mid_block.resnets.0",
           "middle_block.1": "mid_block.attentions.0",
           "middle_block.2": "mid_block.resnets.1"}
  n = 1
  for level in range(levels):
    for j in range(blocks[level]):
      table[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{j}"
      if attn[level]:
        table[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
      n += 1
    if level != levels - 1:
      table[f"input_blocks.{n}.0"] = f"down_blocks.{level}.downsamplers.0"
      n += 1
  n = 0
  for level in reversed(range(levels)):
    up = levels - 1 - level
    for j in range(blocks[level] + 1):
      table[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{j}"
      k = 1
      if attn[level]:
        table[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{j}"
        k = 2
      if level and j == blocks[level]:
        table[f"output_blocks.{n}.{k}"] = f"up_blocks.{up}.upsamplers.0"
      n += 1
  return table


def deepfloyd_key(key: str, prefixes: dict[str, str],
                  cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
  """The diffusers tensor(s) one deepfloyd_if tensor becomes.

  Args:
    key: e.g. "input_blocks.5.1.qkv.weight".
    prefixes: from ``deepfloyd_prefixes``.
    cfg: the diffusers config.

  Returns:
    (diffusers name, part, parts) triples: deepfloyd's attention packs
    q, k, v (and the text's k, v) into one 1x1 convolution, head by head,
    so such a tensor splits into ``parts`` and this name takes ``part``.
    parts == 1 is the whole tensor (a 1x1 Conv1d weight loses its last axis).

  Raises:
    ConvertError: a name that does not map.
  """
  unmapped = ConvertError(f"tensor {key!r} is not one we map.")
  module, _, param = key.rpartition(".")
  if param not in ("weight", "bias", "positional_embedding"):
    raise unmapped
  if key == "encoder_pooling.1.positional_embedding":
    return [("add_embedding.pool.positional_embedding", 0, 1)]
  if module in _DF_TOP:
    return [(f"{_DF_TOP[module]}.{param}", 0, 1)]
  parts = module.split(".")
  depth = 2 if parts[0] == "middle_block" else 3
  prefix, sub = ".".join(parts[:depth]), ".".join(parts[depth:])
  if prefix not in prefixes or param == "positional_embedding":
    raise unmapped
  target = prefixes[prefix]
  if ".attentions." not in target:
    if sub not in _DF_RES:
      raise unmapped
    return [(f"{target}.{_DF_RES[sub]}.{param}", 0, 1)]
  if sub in _DF_ATTN:
    return [(f"{target}.{_DF_ATTN[sub]}.{param}", 0, 1)]
  if sub == "encoder_kv":
    return [(f"{target}.add_k_proj.{param}", 0, 2),
            (f"{target}.add_v_proj.{param}", 1, 2)]
  if sub == "qkv":
    level = target.split(".")[1]
    if target.startswith("mid_block"):
      cross_only = cfg["mid_block_only_cross_attention"]
    elif target.startswith("down_blocks"):
      cross_only = cfg["only_cross_attention"][int(level)]
    else:
      cross_only = cfg["only_cross_attention"][::-1][int(level)]
    if cross_only:
      return [(f"{target}.to_q.{param}", 0, 1)]
    return [(f"{target}.to_{name}.{param}", i, 3)
            for i, name in enumerate("qkv")]
  raise unmapped


def deepfloyd_part_shape(shape: tuple[int, ...], part: int, parts: int,
                         head_dim: int, key: str) -> tuple[int, ...]:
  """The shape ``deepfloyd_part`` gives, from the stored shape alone.

  Args:
    shape: the stored tensor's shape.
    part: which part (every part has the same shape).
    parts: how many parts the tensor packs.
    head_dim: channels per attention head.
    key: the tensor's name, for the message.

  Returns:
    The part's shape (a 1x1 Conv1d weight's kernel axis dropped).

  Raises:
    ConvertError: a shape that is not a 1x1 Conv1d weight or does not split
      into whole heads.
  """
  del part
  shape = tuple(shape)
  if len(shape) == 3:
    if shape[2] != 1:
      raise ConvertError(f"tensor {key!r} of shape {shape} is not a 1x1 "
                         "Conv1d weight.")
    shape = shape[:2]
  if parts > 1 and shape[0] % (parts * head_dim):
    raise ConvertError(f"tensor {key!r} of shape {shape} does not split "
                       f"into {parts} parts of {head_dim}-wide heads.")
  return (shape[0] // parts,) + shape[1:]


def deepfloyd_part(value: np.ndarray, part: int, parts: int,
                   head_dim: int) -> np.ndarray:
  """One of the ``parts`` a packed deepfloyd attention tensor holds.

  Args:
    value: the stored tensor, [parts * C, ...] (a Conv1d weight's trailing
      kernel axis of 1 is dropped).
    part: which (q, k, v order; or k, v for the text's projection).
    parts: how many it packs.
    head_dim: channels per head.

  Returns:
    The rows of that part, [C, ...], heads in order.
  """
  if value.ndim == 3:
    value = value[..., 0]
  if parts == 1:
    return value
  rest = value.shape[1:]
  heads = value.shape[0] // (parts * head_dim)
  # Rows run head by head, each head holding its parts' head_dim rows in
  # turn (deepfloyd reshapes to [heads, parts * head_dim] and splits).
  return value.reshape((heads, parts, head_dim) + rest)[:, part].reshape(
      (heads * head_dim,) + rest)
