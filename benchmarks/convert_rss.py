"""Peak host memory of `imagen-convert` on an IF-sized checkpoint (issue 24).

  python benchmarks/convert_rss.py [--model IF-II-L] [--shard_mb 1000]

Writes a random fp16 checkpoint with the tensor names and shapes of the
model's diffusers state dict (from diffusers on the meta device: nothing of
the model is allocated), sharded like the model cards' files, plus a
text_encoder/config.json (T5-v1.1-XXL) and the demo vocabulary as
tokenizer/spiece.model. Then runs `python -m imagen_jax.convert` in a
subprocess and prints its peak RSS next to the model's float32 size.

The child's ``/proc/PID/status`` is sampled every ``--every`` seconds
(VmRSS split into anonymous memory and mapped file pages, and VmHWM, the
kernel's own peak); each line the converter logs is stamped with the RSS
of that moment, so the table says which phase the memory belongs to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Hugging Face T5-v1.1-XXL's encoder config (what IF's text_encoder/ holds).
T5_XXL = dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64,
              d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32,
              relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
              dropout_rate=0.0)


def write_checkpoint(name: str, src: str, shard_mb: int) -> int:
  """Writes the random fp16 IF directory; returns the parameter count."""
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from imagen_jax import convert_if  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  cfg = convert_if.IF_CONFIGS[name]
  with torch.device("meta"):
    model = diffusers.UNet2DConditionModel(
        **{k: v for k, v in cfg.items() if not k.startswith("_")})
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  unet = os.path.join(src, "unet")
  os.makedirs(unet)
  with open(os.path.join(unet, "config.json"), "w") as f:
    json.dump(cfg, f)
  rng = np.random.default_rng(0)
  groups, cur, size = [], {}, 0
  for key, shape in shapes.items():
    cur[key] = shape
    size += int(np.prod(shape)) * 2
    if size >= shard_mb << 20:
      groups.append(cur)
      cur, size = {}, 0
  if cur:
    groups.append(cur)
  weight_map = {}
  for i, group in enumerate(groups):
    fname = (f"diffusion_pytorch_model.fp16-{i + 1:05d}-of-"
             f"{len(groups):05d}.safetensors")
    save_file({k: (0.02 * rng.standard_normal(s, np.float32)).astype(
        np.float16) for k, s in group.items()}, os.path.join(unet, fname))
    weight_map.update({k: fname for k in group})
  with open(os.path.join(
      unet, "diffusion_pytorch_model.safetensors.index.fp16.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  os.makedirs(os.path.join(src, "text_encoder"))
  with open(os.path.join(src, "text_encoder", "config.json"), "w") as f:
    json.dump(T5_XXL, f)
  os.makedirs(os.path.join(src, "tokenizer"))
  shutil.copy(vocab_lib.default_vocab_path(),
              os.path.join(src, "tokenizer", "spiece.model"))
  return sum(int(np.prod(s)) for s in shapes.values())


def _status(pid: int) -> dict[str, float]:
  """VmRSS, RssAnon, RssFile, VmHWM of a live process, in GiB."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
          out[name] = int(rest.split()[0]) / 2**20
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def run_sampled(cmd: list[str], env: dict, every: float):
  """Runs cmd, sampling its memory; returns (rc, stderr, samples, marks).

  samples: (seconds, status dict) pairs; marks: (seconds, VmRSS GiB, line)
  for each stderr line, so log lines place phases on the RSS curve.
  """
  t0 = time.time()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  samples, marks, err = [], [], []

  def _read():
    for line in proc.stderr:
      err.append(line)
      marks.append((time.time() - t0,
                    _status(proc.pid).get("VmRSS", float("nan")),
                    line.rstrip()))
  reader = threading.Thread(target=_read, daemon=True)
  reader.start()
  while proc.poll() is None:
    st = _status(proc.pid)
    if st:
      samples.append((time.time() - t0, st))
    time.sleep(every)
  reader.join()
  proc.stdout.read()
  return proc.returncode, "".join(err), samples, marks


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="IF-II-L", choices=("IF-II-L", "IF-I-XL"))
  p.add_argument("--shard_mb", type=int, default=1000)
  p.add_argument("--keep", action="store_true", help="Keep the temp dir.")
  p.add_argument("--every", type=float, default=0.1,
                 help="Seconds between RSS samples of the converter.")
  p.add_argument("--trace", action="store_true",
                 help="Print every log line with the RSS at that moment.")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="convert_rss_")
  try:
    src, out = os.path.join(tmp, args.model), os.path.join(tmp, "export")
    t0 = time.time()
    count = write_checkpoint(args.model, src, args.shard_mb)
    files = sorted(os.listdir(os.path.join(src, "unet")))
    written = time.time() - t0
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    t0 = time.time()
    rc, stderr, samples, marks = run_sampled(
        [sys.executable, "-m", "imagen_jax.convert", "--src", src, "--out",
         out, "--variant", "fp16"], env, args.every)
    took = time.time() - t0
    if rc:
      sys.exit(f"convert exited {rc}: {stderr[-1500:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if args.trace:
      step = max(1, len(samples) // 40)
      curve = [(t, st.get("VmRSS", 0), f"(anon {st.get('RssAnon', 0):.2f}, "
                f"file {st.get('RssFile', 0):.2f})")
               for t, st in samples[::step]]
      for t, rss, line in sorted(curve + marks):
        print(f"{t:7.1f} s {rss:6.2f} GiB  {line[:150]}")
    top = max(samples, key=lambda s: s[1].get("VmRSS", 0))
    print(f"sampled peak VmRSS {top[1]['VmRSS']:.2f} GiB at {top[0]:.1f} s "
          f"(anon {top[1].get('RssAnon', 0):.2f}, file "
          f"{top[1].get('RssFile', 0):.2f}); peak anon "
          f"{max(s[1].get('RssAnon', 0) for s in samples):.2f} GiB; "
          f"last VmHWM {samples[-1][1].get('VmHWM', 0):.2f} GiB")
    print(f"{time.strftime('%Y-%m-%d')} | {platform.node()} | "
          f"{os.cpu_count()} cores | checkpoint written in {written:.0f} s")
    print("| model | params | fp16 files | float32 size | peak RSS | "
          "convert wall |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {count / 1e9:.3f} B | "
          f"{sum(f.endswith('.safetensors') for f in files)} shards, "
          f"{count * 2 / 2**30:.2f} GiB | {count * 4 / 2**30:.2f} GiB | "
          f"{peak:.2f} GiB | {took:.0f} s |")
  finally:
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
