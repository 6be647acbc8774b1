"""U-Net training-step speed: ours (JAX) vs imagen-pytorch, same size, same machine.

  python benchmarks/unet_speed.py [--batch=8] [--configs=tiny,cpu] [--no-torch]
      [--kernels=auto,reference,...] [--baseline=GIT_REV]

For each config: forward+backward time of one denoising-loss step at batch 8,
its FLOPs (XLA cost analysis of the lowered step), the FLOP/s reached as a
fraction of this machine's measured float32 matmul FLOP/s (same run), the
compiled memory estimate and the peak RSS of the measuring process. Then the
same U-Net shape built with imagen-pytorch's ``Unet`` (params printed side by
side) timed on the same forward+backward, and the throughput ratio.

Each framework runs in its own subprocess so thread pools and peak RSS do not
mix. The subprocesses stay alive side by side and are timed in turn,
``--steps`` steps each per round for ``--rounds`` rounds
(``common.interleave``), so both frameworks see the same drift of this shared
host's load. The ratio is the median over rounds of each round's pair of
median step times; ms/step is each side's fastest round (median of its
steps). imagen-pytorch needs torch + torchvision, kept out of the test extras:
build the benchmark environment with ``benchmarks/setup_bench_env.sh``.

``--kernels`` times one worker of ours per kernel implementation
(``imagen_jax.kernels``; the first is the row the others are compared
with). ``--baseline=REV`` adds a worker running the U-Net of another
commit (checked out into a temporary git worktree and imported from there,
with that commit's own copy of this script), interleaved with ours: the
A/B of a change against the code before it, on the same loaded host.

Targets: the cpu config reaches >= 50% of matmul FLOP/s; >= 1.3x the
throughput of the same-size imagen-pytorch U-Net.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import common

from imagen_jax import xla_flags

STAGE = "base64"


def _jax_worker(variant: str, batch: int, text_len: int, dtype: str,
                kernels: str = "auto"):
  """Builds our U-Net step; returns (facts, one blocking step)."""
  import jax
  import jax.numpy as jnp
  from imagen_jax import build, diffusion
  from imagen_jax import kernels as kernels_lib
  from imagen_jax.train import metrics
  from tests import helpers

  config = helpers.load_config(STAGE, variant)
  config.model.dtype = dtype
  config.model.kernels = kernels
  module = build.build_unet(config.model)
  # Step time does not depend on the values: skip the host-side noise on
  # the 2B params of the paper config.
  _, params, inputs = helpers.init_unet(STAGE, batch=batch,
                                        text_len=text_len, variant=variant,
                                        live=variant != "paper")
  inputs = helpers.random_inputs(inputs)
  schedule = diffusion.get_logsnr_schedule("cosine")

  def loss_fn(p, rng):
    def model_fn(z, logsnr):
      return module.apply({"params": p}, z, logsnr, inputs["text"],
                          inputs["text_mask"])
    loss, _ = diffusion.diffusion_loss(model_fn, inputs["x"], rng,
                                       schedule=schedule)
    return loss.mean()

  step = jax.jit(jax.value_and_grad(loss_fn))
  lowered = step.lower(params, jax.random.PRNGKey(0))
  compiled = lowered.compile()
  flops = metrics.step_flops(lowered)
  mem = compiled.memory_analysis()
  mem_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
               + mem.output_size_in_bytes) if mem is not None else 0
  rng = jax.random.PRNGKey(1)

  def step():
    common.block(compiled(params, rng))

  common.time_call(step, repeats=2)  # warm
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  info = dict(params=build.count_params(params), flops=flops,
              kernels=kernels_lib.resolve(kernels),
              compiled_mem=mem_bytes, res=int(config.resolution),
              peak=common.matmul_peak_flops(dtype=jnp.dtype(dtype)),
              device_peak_mem=stats.get("peak_bytes_in_use", 0))
  return info, step


def _torch_worker(variant: str, batch: int, text_len: int, dtype: str):
  """Builds imagen-pytorch's U-Net step; returns (facts, one blocking step)."""
  import importlib.util
  import math
  import types

  import torch
  import transformers
  from tests import helpers

  config = helpers.load_config(STAGE, variant)
  m = config.model
  # imagen-pytorch asks the model hub for its default T5's config at import;
  # register a local one first (the hub is unreachable here).
  spec = importlib.util.find_spec("imagen_pytorch")
  stub = types.ModuleType("imagen_pytorch")
  stub.__path__ = list(spec.submodule_search_locations)
  sys.modules["imagen_pytorch"] = stub
  import imagen_pytorch.t5 as ip_t5
  ip_t5.T5_CONFIGS[ip_t5.DEFAULT_T5_NAME] = dict(
      config=transformers.T5Config(d_model=int(m.text_dim)))
  del sys.modules["imagen_pytorch"]
  from imagen_pytorch import Unet

  torch.set_num_threads(os.cpu_count())
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    # XLA's default float32 dot and conv on NVIDIA GPUs use TF32 tensor
    # cores; let torch do the same (its convs already do by default).
    torch.set_float32_matmul_precision("high")
  unet = Unet(
      dim=int(m.base_channels), dim_mults=tuple(m.channel_mult),
      num_resnet_blocks=tuple(m.num_res_blocks),
      layer_attns=tuple(m.self_attn), layer_cross_attns=tuple(m.cross_attn),
      attn_dim_head=int(m.head_dim), attn_heads=max(int(m.cond_dim) // int(m.head_dim), 2),
      text_embed_dim=int(m.text_dim), cond_dim=int(m.cond_dim),
      channels=3, memory_efficient=False,
      init_conv_to_final_conv_residual=False, lowres_cond=False,
  ).to(device)
  n_params = sum(p.numel() for p in unet.parameters())
  res = int(config.resolution)
  x = torch.randn(batch, 3, res, res, device=device)
  text = torch.randn(batch, text_len, int(m.text_dim), device=device)
  mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
  opt_params = list(unet.parameters())
  # bfloat16: autocast, the mixed precision torch users train with (params
  # stay float32, as ours do with compute dtype bfloat16).
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16")

  def step():
    t = torch.rand(batch, device=device)
    noise = torch.randn_like(x)
    # cosine log-SNR as in ours; imagen-pytorch takes noise times in [0, 1].
    logsnr = -torch.log(torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** -2 - 1)
    alpha = torch.sigmoid(logsnr).sqrt()[:, None, None, None]
    sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
    z = alpha * x + sigma * noise
    with autocast:
      out = unet(z, t, text_embeds=text, text_mask=mask)
    loss = ((out.float() - noise) ** 2).mean()
    for p in opt_params:
      p.grad = None
    loss.backward()
    if device.type == "cuda":
      torch.cuda.synchronize()

  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    step()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  common.time_call(step, repeats=1)  # warm (the counted step was the first)
  peak_mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else 0)
  info = dict(params=n_params, flops=float(counter.get_total_flops()),
              device_peak_mem=peak_mem)
  return info, step


def _start_worker(kind: str, variant: str, batch: int, text_len: int,
                  dtype: str, keep_xla_flags: bool = False,
                  kernels: str = "auto", tree: str | None = None
                  ) -> common.StepWorker:
  """Starts a worker; ``tree``: another checkout whose code it runs."""
  env = dict(os.environ)
  if keep_xla_flags:
    # XLA's defaults: our own import already put the opt-out into XLA_FLAGS.
    env["IMAGEN_JAX_KEEP_XLA_FLAGS"] = "1"
    env["XLA_FLAGS"] = xla_flags.without_ynn_setting(env.get("XLA_FLAGS", ""))
  args = ["--worker", kind, "--configs", variant, "--batch", str(batch),
          "--text_len", str(text_len), "--dtype", dtype]
  script = __file__
  if tree is None:
    args += ["--kernels", kernels]
  else:
    script = os.path.join(tree, "benchmarks", "unet_speed.py")
    env["PYTHONPATH"] = os.pathsep.join(
        [tree] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                  if p and os.path.abspath(p) != _ROOT])
  return common.StepWorker(script, args, env)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _baseline_tree(rev: str) -> str:
  """Checks ``rev`` out into a temporary detached git worktree; its path."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  tree = os.path.join(tempfile.mkdtemp(prefix="unet_speed_baseline_"), "tree")
  subprocess.run(["git", "-C", _ROOT, "worktree", "add", "--detach", "-q",
                  tree, rev], check=True)
  return tree


def _remove_tree(tree: str) -> None:
  import subprocess  # pylint: disable=g-import-not-at-top
  subprocess.run(["git", "-C", _ROOT, "worktree", "remove", "--force", tree],
                 check=False)
  try:
    os.rmdir(os.path.dirname(tree))
  except OSError:
    pass


def _summary(info: dict, rounds: list[list[float]], result: dict) -> dict:
  """Worker facts plus its fastest round's median step and peak RSS."""
  medians = [statistics.median(r) for r in rounds]
  return dict(info, secs=min(medians), round_medians=medians,
              rss=result["rss"])


def _row(label: str, run: dict, batch: int, peak: float, compiled_mem,
         vs_ours: str, paired: str) -> list:
  """One table row: a worker's speed, FLOPs, memory and its ratios to ours."""
  flops_s = run["flops"] / run["secs"]
  return [label, run["params"], run["secs"] * 1e3, batch / run["secs"],
          run["flops"] / 1e9, flops_s / 1e9, flops_s / peak, compiled_mem,
          run["rss"] / 2**20, run["device_peak_mem"] / 2**20, vs_ours, paired]


def _paired_ratio(ours: dict, theirs: dict) -> tuple[float, float, float]:
  """Median and quartiles over rounds of our / their median step time."""
  ratios = sorted(a / b for a, b in zip(ours["round_medians"],
                                        theirs["round_medians"]))
  q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
  return statistics.median(ratios), q[0], q[-1]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--text_len", type=int, default=16)
  parser.add_argument("--configs", default="tiny,cpu")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--ynn", action="store_true",
                      help="also time XLA's default YNNPACK fusions")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"),
                      help="compute dtype (bfloat16: ours with bf16 compute, "
                      "imagen-pytorch under bf16 autocast; params float32)")
  parser.add_argument("--rounds", type=int, default=15,
                      help="rounds of interleaved timing: in each, every "
                      "worker times --steps steps in turn; this shared "
                      "host's load drifts by 10-30%% over a minute, and "
                      "interleaving exposes all sides to the same drift")
  parser.add_argument("--steps", type=int, default=4,
                      help="steps per worker per round")
  parser.add_argument("--kernels", default="auto",
                      help="comma list of kernel implementations "
                      "(imagen_jax.kernels.CHOICES), one worker each")
  parser.add_argument("--baseline", default=None,
                      help="git revision whose U-Net is timed beside ours")
  parser.add_argument("--worker", default=None)
  args = parser.parse_args()
  if args.worker:
    if args.worker == "jax":
      info, step = _jax_worker(args.configs, args.batch, args.text_len,
                               args.dtype, args.kernels)
    else:
      info, step = _torch_worker(args.configs, args.batch, args.text_len,
                                 args.dtype)
    common.serve_steps(info, step)
    return
  tree = _baseline_tree(args.baseline) if args.baseline else None
  try:
    _compare(args, tree)
  finally:
    if tree is not None:
      _remove_tree(tree)


def _compare(args, tree):
  """Starts the workers of every config, times them interleaved, prints."""
  kernel_choices = args.kernels.split(",")

  print(common.machine_line())
  rows, spreads = [], []
  for variant in args.configs.split(","):
    kinds = [("jax", {"kernels": kernel_choices[0]})]
    kinds += [("jax", {"kernels": k}) for k in kernel_choices[1:]]
    if tree is not None:
      kinds.append(("jax", {"tree": tree}))
    if args.ynn:
      kinds.append(("jax", {"keep_xla_flags": True}))
    if not args.no_torch:
      kinds.append(("torch", {}))
    # Started one after another: our worker measures the matmul peak before
    # any other is alive.
    workers = [_start_worker(kind, variant, args.batch, args.text_len,
                             args.dtype, **kw) for kind, kw in kinds]
    times = common.interleave(workers, max(args.rounds, 1), args.steps)
    runs = [_summary(w.info, t, w.close()) for w, t in zip(workers, times)]
    ours = runs[0]
    peak = ours["peak"]
    rows.append(_row(f"imagen_jax {STAGE}:{variant} {ours['res']}px "
                     f"kernels={ours.get('kernels')}", ours,
                     args.batch, peak, ours["compiled_mem"] / 2**20, "1.00",
                     "1.00"))
    for (kind, kw), other in zip(kinds[1:], runs[1:]):
      ratio, q1, q3 = _paired_ratio(ours, other)
      if kind == "jax":
        if "tree" in kw:
          label = f"  same, baseline {args.baseline}"
          spreads.append(f"{STAGE}:{variant}: our time / baseline "
                         f"{args.baseline}'s, per round: median {ratio:.3f} "
                         f"(quartiles {q1:.3f}-{q3:.3f})")
        elif "kernels" in kw:
          label = f"  same, kernels={other.get('kernels')}"
          spreads.append(f"{STAGE}:{variant}: kernels={ours.get('kernels')} "
                         f"time / kernels={other.get('kernels')}'s, per "
                         f"round: median {ratio:.3f} (quartiles {q1:.3f}-"
                         f"{q3:.3f})")
        else:
          label = "  same, XLA default (YNNPACK)"
        mem = other["compiled_mem"] / 2**20
      else:
        label, mem = "  imagen-pytorch same config", "-"
        spreads.append(f"{STAGE}:{variant}: our time / imagen-pytorch's, "
                       f"per round: median {ratio:.3f} (quartiles {q1:.3f}-"
                       f"{q3:.3f}), i.e. {1 / ratio:.2f}x its throughput "
                       f"({1 / q3:.2f}x-{1 / q1:.2f}x)")
      rows.append(_row(label, other, args.batch, peak, mem,
                       f"{ours['secs'] / other['secs']:.2f}", f"{ratio:.3f}"))
  print(f"\nForward+backward of the denoising loss, batch {args.batch}, "
        f"{args.text_len} text tokens, {args.dtype} compute; {args.rounds} "
        f"interleaved rounds of {args.steps} steps per framework; ms/step: "
        "the fastest round's median step; measured "
        f"{args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s. Last two columns: "
        "our ms/step / that row's, and the median over rounds of our round "
        "median / its round median (the paired figure; below 1: ours is "
        "faster). Device peak: accelerator memory in use at most (0 on CPU).")
  common.print_table(
      ["model", "params", "ms/step", "img/s", "GFLOP/step", "GFLOP/s",
       "of matmul peak", "XLA mem MiB", "peak RSS MiB", "device peak MiB",
       "our time / its time", "paired, per round"], rows)
  for line in spreads:
    print(line)


if __name__ == "__main__":
  main()
