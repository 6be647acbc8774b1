"""Reading T5 encoder weights from t5x and Hugging Face checkpoints.

t5x (legacy layout, used by the released T5 v1.1 checkpoints such as
``gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000``): a
directory with a msgpack file ``checkpoint`` holding
``{"version": 3, "optimizer": {"target": params, "state": ...}}`` where every
large parameter is replaced by a TensorStore spec (zarr driver, gzip chunks)
whose ``kvstore.path`` (e.g. ``target.encoder.layers_0.attention.key.kernel``)
is relative to the checkpoint directory, and small ones are stored inline.
Only the encoder half (``target/token_embedder`` and ``target/encoder``) is
read, so the decoder of an encoder-decoder checkpoint costs nothing. A plain
orbax PyTree checkpoint of the same tree (newer t5x, or our own export) is
read too.

Hugging Face: a directory with ``config.json`` and ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``, which
needs torch) of ``T5EncoderModel`` or ``T5ForConditionalGeneration``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from imagen_jax import fileio
from imagen_jax.models.t5 import T5Config

Params = dict[str, Any]


# --- Hugging Face ---------------------------------------------------------------

def hf_config_to_t5(config: Mapping[str, Any], dtype: str = "float32"
                    ) -> T5Config:
  """Maps a Hugging Face ``T5Config`` dict to ours."""
  if config.get("model_type") not in (None, "t5", "umt5", "mt5"):
    raise ValueError(f"config.json describes a {config.get('model_type')!r} "
                     "model, not T5; pass a T5 checkpoint directory.")
  ff = config.get("feed_forward_proj", "relu")
  gated = ff.startswith("gated-")
  act = ff.split("-")[-1]
  if act in ("gelu_new", "gelu_pytorch_tanh"):
    act = "gelu"
  if act not in ("gelu", "relu"):
    raise ValueError(f"Unsupported T5 feed_forward_proj {ff!r}; expected "
                     "gated-gelu (T5 v1.1) or relu (T5 1.0).")
  return T5Config(
      vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]),
      d_ff=int(config["d_ff"]), num_heads=int(config["num_heads"]),
      head_dim=int(config["d_kv"]), num_layers=int(config["num_layers"]),
      num_buckets=int(config.get("relative_attention_num_buckets", 32)),
      max_distance=int(config.get("relative_attention_max_distance", 128)),
      layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
      gated=gated, activation=act, dtype=dtype)


def _read_hf_tensors(path: str) -> Mapping[str, np.ndarray]:
  single = fileio.join(path, "model.safetensors")
  index = fileio.join(path, "model.safetensors.index.json")
  torch_bin = fileio.join(path, "pytorch_model.bin")

  def load_file(name):
    # Tensor by tensor: a URL's shard is never held as bytes beside its
    # arrays, and bfloat16 checkpoints read too.
    from imagen_jax import tensor_files  # pylint: disable=g-import-not-at-top
    return {key: ref.read()
            for key, ref in tensor_files.read_safetensors(name).items()}
  if fileio.isfile(single):
    return load_file(single)
  if fileio.isfile(index):
    files = sorted(set(fileio.read_json(index)["weight_map"].values()))
    out = {}
    for name in files:
      out.update(load_file(fileio.join(path, name)))
    return out
  if fileio.isfile(torch_bin):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"{torch_bin} is a PyTorch pickle and torch is not "
                        "installed; install torch or convert the checkpoint to "
                        "safetensors.") from None
    with fileio.open_file(torch_bin, "rb") as f:
      state = torch.load(f, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(
      f"{path!r} has no model.safetensors, model.safetensors.index.json or "
      "pytorch_model.bin; pass a Hugging Face T5 checkpoint directory.")


def load_hf(path: str, dtype: str = "float32") -> tuple[T5Config, Params]:
  """Reads a Hugging Face T5 directory into our (t5x-named) encoder params.

  Args:
    path: directory with config.json and weights.
    dtype: compute dtype recorded in the returned config.

  Returns:
    (config, params) with float32 numpy params.
  """
  cfg_path = fileio.join(path, "config.json")
  if not fileio.isfile(cfg_path):
    raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face "
                            "T5 checkpoint directory.")
  config = hf_config_to_t5(fileio.read_json(cfg_path), dtype)
  w = _read_hf_tensors(path)

  def get(name):
    if name not in w:
      raise KeyError(f"{path!r} has no tensor {name!r}: not a T5 encoder "
                     "checkpoint?")
    return np.asarray(w[name], np.float32)

  emb = w.get("shared.weight", w.get("encoder.embed_tokens.weight"))
  if emb is None:
    raise KeyError(f"{path!r} has neither shared.weight nor "
                   "encoder.embed_tokens.weight: not a T5 checkpoint?")
  enc: Params = {
      "relpos_bias": {"rel_embedding": get(
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").T},
      "encoder_norm": {"scale": get("encoder.final_layer_norm.weight")},
  }
  for i in range(config.num_layers):
    p = f"encoder.block.{i}.layer."
    attn = {n: {"kernel": get(f"{p}0.SelfAttention.{h}.weight").T}
            for n, h in (("query", "q"), ("key", "k"), ("value", "v"),
                         ("out", "o"))}
    mlp_names = ("wi_0", "wi_1", "wo") if config.gated else ("wi", "wo")
    mlp = {n: {"kernel": get(f"{p}1.DenseReluDense.{n}.weight").T}
           for n in mlp_names}
    enc[f"layers_{i}"] = {
        "pre_attention_layer_norm": {"scale": get(f"{p}0.layer_norm.weight")},
        "attention": attn,
        "pre_mlp_layer_norm": {"scale": get(f"{p}1.layer_norm.weight")},
        "mlp": mlp,
    }
  return config, {"token_embedder": {"embedding": np.asarray(emb, np.float32)},
                  "encoder": enc}


# --- t5x ------------------------------------------------------------------------

def _is_ts_spec(x) -> bool:
  return isinstance(x, dict) and "driver" in x and "kvstore" in x


def _read_ts(spec: dict, ckpt_dir: str) -> np.ndarray:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = json.loads(json.dumps(spec, default=_json_default))
  rel = spec["kvstore"].get("path", spec.get("path", ""))
  spec.pop("path", None)  # tensorstore < 0.1.14 kept the path at the top
  spec["kvstore"] = _kvstore(fileio.join(ckpt_dir, rel))
  arr = ts.open(spec, open=True, read=True).result().read().result()
  return np.asarray(arr, np.float32)


def _kvstore(path: str) -> dict:
  """A tensorstore kvstore spec for a local path or a gs:// URL."""
  if path.startswith("gs://"):
    bucket, _, prefix = path[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": prefix}
  return {"driver": "file", "path": path}


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, bytes):
    return x.decode()
  raise TypeError(type(x))


def _encoder_subtree(target: Params, where: str) -> Params:
  if "encoder" not in target or "token_embedder" not in target:
    raise ValueError(f"{where} holds no T5 encoder (no target/encoder and "
                     "target/token_embedder); pass a t5x T5 checkpoint.")
  return {"token_embedder": target["token_embedder"],
          "encoder": target["encoder"]}


def load_t5x(checkpoint_dir: str) -> Params:
  """Reads the encoder params of a t5x checkpoint directory (numpy, float32).

  Args:
    checkpoint_dir: a ``checkpoint_<step>`` directory (legacy t5x layout) or
      an orbax PyTree checkpoint of the params tree.

  Returns:
    ``{"token_embedder": ..., "encoder": ...}`` in t5x names.
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  if not fileio.isdir(checkpoint_dir):
    raise FileNotFoundError(f"T5 checkpoint directory {checkpoint_dir!r} does "
                            "not exist.")
  msgpack = os.path.join(checkpoint_dir, "checkpoint")
  if fileio.isfile(msgpack) and not fileio.isfile(
      os.path.join(checkpoint_dir, "_METADATA")):
    state = serialization.msgpack_restore(fileio.read_bytes(msgpack))
    target = state.get("optimizer", state).get("target")
    if target is None:
      raise ValueError(f"{msgpack} has no optimizer/target tree: not a t5x "
                       "checkpoint.")
    sub = _encoder_subtree(target, checkpoint_dir)

    def read(x):
      return _read_ts(x, checkpoint_dir) if _is_ts_spec(x) else \
          np.asarray(x, np.float32)
    return _map_leaves(sub, read)
  # orbax PyTree checkpoint (params tree, optionally under "target")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    tree = ocp.PyTreeCheckpointer().restore(fileio.abspath(checkpoint_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{checkpoint_dir!r} is neither a t5x checkpoint (no "
                     f"'checkpoint' msgpack) nor an orbax checkpoint ({e}).") from None
  tree = tree.get("target", tree)
  return _map_leaves(_encoder_subtree(tree, checkpoint_dir),
                     lambda x: np.asarray(x, np.float32))


def _map_leaves(tree, fn):
  if isinstance(tree, dict) and not _is_ts_spec(tree):
    return {k: _map_leaves(v, fn) for k, v in tree.items()}
  return fn(tree)


def save_t5x(params: Params, checkpoint_dir: str, step: int = 0,
             inline_max_elements: int = 0) -> None:
  """Writes encoder params in t5x's legacy layout (msgpack + zarr stores).

  This is what t5x's ``Checkpointer.save`` produces for a model holding only
  these parameters: every partitioned parameter (all of T5's) goes to a
  TensorStore zarr array named by its dotted path; arrays up to
  ``inline_max_elements`` can be kept inline in the msgpack instead, as t5x
  does for unpartitioned ones.

  Args:
    params: ``{"token_embedder": ..., "encoder": ...}`` (numpy or jax).
    checkpoint_dir: directory to create.
    step: step recorded in the state.
    inline_max_elements: arrays up to this size are stored in the msgpack.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  fileio.makedirs(checkpoint_dir)

  def write(path, arr):
    arr = np.asarray(arr, np.float32)
    if arr.size <= inline_max_elements:
      return arr
    name = ".".join(("target",) + path)
    spec = {"driver": "zarr", "dtype": "float32",
            "kvstore": {"driver": "file", "path": name},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(arr.shape),
                         "chunks": list(arr.shape)}}
    full = json.loads(json.dumps(spec))
    full["kvstore"] = _kvstore(fileio.join(checkpoint_dir, name))
    store = ts.open(full, create=True, delete_existing=True).result()
    store.write(arr).result()
    return spec

  def walk(tree, path=()):
    if isinstance(tree, dict):
      return {k: walk(v, path + (k,)) for k, v in tree.items()}
    return write(path, tree)

  target = walk(dict(params))
  state = {"version": 3, "optimizer": {"target": target,
                                       "state": {"step": np.int64(step)}}}
  fileio.write_bytes(fileio.join(checkpoint_dir, "checkpoint"),
                     serialization.msgpack_serialize(state))
