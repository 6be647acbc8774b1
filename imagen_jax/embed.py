"""`imagen-embed`: runs the frozen T5 once per caption and writes the store.

  imagen-embed --config=configs/base64.py --workdir=DIR [--config.x=y ...]
  python -m imagen_jax.embed ...                     (the same)

Streams the config's caption Task (``config.data``) in a fixed order, encodes
captions in large batches with the T5 of ``config.text`` sharded over this
process's devices, and writes training-ready shards (image bytes + bfloat16
embeddings trimmed to each caption's length) to ``config.data.store`` or
``WORKDIR/embeddings``. A killed job restarts after its last finished shard;
the result is byte-identical to an uninterrupted run (but for the manifest's
timestamp). With several processes (jax.distributed, or --process_index /
--process_count), each embeds its own slice of the Task (seqio ShardInfo) on
its own devices; process 0 writes the index once all are done.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from imagen_jax import host_malloc


def store_path(config, workdir: str) -> str:
  """Where a config's embedding store lives."""
  from imagen_jax import fileio  # pylint: disable=g-import-not-at-top
  return config.data.store or fileio.join(workdir, "embeddings")


def run_embed(config, workdir: str, process_index: Optional[int] = None,
              process_count: Optional[int] = None, progress: bool = True) -> dict:
  """Builds (or completes) the embedding store of ``config``.

  Args:
    config: full stage config (uses text, data, embed).
    workdir: default parent of the store.
    process_index: this process; defaults to jax.process_index().
    process_count: processes; defaults to jax.process_count().
    progress: show a progress bar.

  Returns:
    The store manifest (every process returns it once process 0 wrote it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from imagen_jax import parallel  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import store as store_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import tasks  # pylint: disable=g-import-not-at-top

  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  batch_size = int(config.embed.batch_size)
  shard_size = int(config.embed.shard_size)
  if shard_size % batch_size:
    raise ValueError(f"embed.shard_size ({shard_size}) must be a multiple of "
                     f"embed.batch_size ({batch_size}) so restarts see the same "
                     "batches.")
  path = store_path(config, workdir)
  max_length = int(config.text.max_length)
  mesh = parallel.make_mesh(tuple(config.embed.mesh_shape), jax.local_devices())
  encoder = encoder_lib.from_config(config.text, mesh=mesh)
  if store_lib.is_complete(path):
    store = store_lib.EmbeddingStore(path)
    store.check_text_encoder(encoder.spec, "config.text")
    print(f"embedding store {path} is complete ({len(store)} captions).")
    return store.manifest

  task_name = f"imagen_captions_{config.data.source}"
  task = tasks.register_from_config(task_name, config.data,
                                    encoder.spec["vocab"])
  writer = store_lib.StoreWriter(path, pi)
  start_shard = writer.completed_shards()
  ds = task.get_dataset(sequence_length={"text": max_length},
                        split=config.data.split, shuffle=False,
                        shard_info=seqio.ShardInfo(pi, pc), num_epochs=1,
                        try_in_mem_cache=False)
  ds = ds.skip(start_shard * shard_size)
  total = _count_hint(task, config.data.split, pc)
  bar = tqdm(total=total, initial=start_shard * shard_size, unit="captions",
             disable=not progress, dynamic_ncols=True,
             desc=f"embed [{pi}/{pc}]")
  if start_shard:
    logging.info("resuming after %d finished shards", start_shard)
  records: list[bytes] = []
  sides: list[int] = []
  k = start_shard
  pending: list[dict] = []
  d_model = encoder.d_model

  def flush_batch(batch):
    ids = np.zeros((batch_size, max_length), np.int32)
    for i, ex in enumerate(batch):
      ids[i, :len(ex["text"])] = ex["text"]
    emb, _ = encoder.encode_tokens(ids, ids != 0)
    emb = np.asarray(jax.device_get(emb))
    for i, ex in enumerate(batch):
      n = len(ex["text"])
      records.append(store_lib.encode_record(
          ex["id"].decode("utf-8", "replace"),
          ex["caption"].decode("utf-8", "replace"), ex["image"], emb[i, :n],
          int(ex["untrimmed_length"])))
      sides.append(min(preprocess.image_size(ex["image"])))
    bar.update(len(batch))

  for ex in ds.as_numpy_iterator():
    pending.append(ex)
    if len(pending) == batch_size:
      flush_batch(pending)
      pending = []
    if len(records) == shard_size:
      writer.write_shard(k, records, sides)
      k += 1
      records, sides = [], []
  if pending:
    flush_batch(pending)
  if records:
    writer.write_shard(k, records, sides)
  bar.close()
  writer.mark_done(writer.shard_stats(max_length))
  if pi == 0:
    manifest = store_lib.finalize(path, pc, text_encoder=encoder.spec,
                                  d_model=d_model, max_length=max_length,
                                  task=task_name)
  else:
    while not store_lib.is_complete(path):
      time.sleep(0.5)
    manifest = store_lib.EmbeddingStore(path).manifest
  if manifest["truncated"]:
    logging.warning("%d captions were longer than %d tokens and were "
                    "truncated.", manifest["truncated"], max_length)
  return manifest


def _count_hint(task, split, pc):
  try:
    n = task.source.num_input_examples(split)
    return None if n is None else -(-int(n) // pc)
  except Exception:  # pylint: disable=broad-except
    return None


PROG = "imagen-embed"
_F: dict = {}


def _define_flags() -> None:
  """Defines the CLI flags (only when run as the CLI: library users and the
  demo import this module next to their own ``--config``)."""
  _F["config"] = config_flags.DEFINE_config_file("config", None,
                                                 "Stage config file.")
  _F["workdir"] = flags.DEFINE_string("workdir", None, "Output directory.")
  _F["process_index"] = flags.DEFINE_integer(
      "process_index", None, "This process (without jax.distributed).")
  _F["process_count"] = flags.DEFINE_integer(
      "process_count", None, "Number of processes (without jax.distributed).")
  _F["coordinator"] = flags.DEFINE_string(
      "coordinator", None, "host:port of jax.distributed's coordinator.")


def main(argv) -> int:
  """CLI main; returns the exit code."""
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  from imagen_jax import parallel  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments {argv[1:]}; everything is a --flag.")
  config = cli.config_value(PROG, _F["config"])
  workdir = _F["workdir"].value
  if workdir is None:
    cli.fail(PROG, "--workdir is required.")
  try:
    if _F["coordinator"].value:
      parallel.initialize_distributed(_F["coordinator"].value,
                                      _F["process_count"].value,
                                      _F["process_index"].value)
      run_embed(config, workdir)
    else:
      run_embed(config, workdir, _F["process_index"].value,
                _F["process_count"].value)
  except ValueError as e:
    cli.fail(PROG, str(e))
  return 0


def run_main():
  """Console-script entry point."""
  host_malloc.maybe_reexec()
  from imagen_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  run_main()
