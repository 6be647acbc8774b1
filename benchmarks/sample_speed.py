"""Cascade sampling speed: ours vs imagen-pytorch, same U-Nets, same machine.

  python benchmarks/sample_speed.py [--batch=8] [--steps=25,100] [--no-torch]

The cascade is the embedded default's (``imagen_jax/demo_config.py``): a
16x16 base U-Net and a 16 -> 64 Efficient U-Net, random weights. For each
step count, images/s of the full cascade (text -> 64x64 images) with
classifier-free guidance on both stages (scale 3.0 base, 2.0 SR) and the
ancestral sampler, then the same two U-Net shapes built with imagen-pytorch
(``Unet`` x2 inside ``Imagen``, continuous-time, dynamic thresholding) sampling
the same number of steps with the same guidance, and the ratio. Each side runs
in its own subprocess (thread pools, peak RSS). Our timing excludes
compilation (reported separately) and includes the T5 encode; imagen-pytorch
gets precomputed text embeddings. A second call of ours with the same
settings is checked to compile nothing.

Targets: >= 3x imagen-pytorch's images/s; the second call compiles nothing.
imagen-pytorch needs torch + torchvision: ``benchmarks/setup_bench_env.sh``.

DeepFloyd IF rows (``--if_model=tiny`` on CPU, ``--if_model=IF-I-XL`` on a
GPU): IF's stage I U-Net with random weights, ours (``UNet(family="if")``,
bfloat16 on accelerators, one row per ``--if_kernels`` implementation, e.g.
``cudnn,reference``) against diffusers' ``IFPipeline`` (float16 on CUDA)
with the same respaced steps (``--if_timesteps``, default smart27),
guidance 7, learned-variance ancestral sampling, precomputed text
embeddings (77 tokens) on both sides; each in its own subprocess. Each IF
row is printed as it completes, so a run cut short keeps the rows it has.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import common

GUIDANCE = (3.0, 2.0)
TEXT_LEN = 24


def _demo_configs():
  from imagen_jax import demo, demo_config
  cfg = demo_config.get_config("shapes")
  return (demo.stage_config(cfg, "base", "/tmp/unused", 256),
          demo.stage_config(cfg, "sr", "/tmp/unused", 256))


def _jax_worker(batch: int, steps: int) -> dict:
  import flax.linen as nn
  import jax
  from jax._src import dispatch
  from imagen_jax import build, cascade, parallel
  from imagen_jax.stage import Stage
  from imagen_jax.text import encoder as encoder_lib

  configs = _demo_configs()
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  enc = encoder_lib.TextEncoder.random("demo", max_length=TEXT_LEN, mesh=mesh)
  stages = []
  n_params = []
  for i, cfg in enumerate(configs):
    stage = Stage.from_config(cfg)
    params = nn.unbox(jax.jit(stage.unet.init)(
        jax.random.PRNGKey(i), **build.unet_inputs(cfg, 1, 4))["params"])
    n_params.append(build.count_params(params))
    stages.append(cascade.LoadedStage(f"stage{i}", cfg, stage, params, enc.spec))
  cas = cascade.Cascade(stages, enc, mesh)
  settings = [cascade.StageSettings(sampler="ancestral", num_steps=steps,
                                    guidance_scale=g, aug_level=0.1)
              for g in GUIDANCE]
  prompts = [f"a red circle above a blue square {i}" for i in range(batch)]
  t = time.perf_counter()
  cas.sample(prompts, settings=settings, seed=0)
  first = time.perf_counter() - t
  lowerings = []

  def listener(event, duration, **kw):
    del duration, kw
    if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
      lowerings.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  secs = common.time_call(lambda: cas.sample(prompts, settings=settings, seed=1),
                          repeats=3, warmup=0)
  jax.monitoring.unregister_event_duration_listener(listener)
  return dict(secs=secs, compile_s=first - secs, params=n_params,
              lowerings=len(lowerings), compilations=cas.compilations)


def _torch_worker(batch: int, steps: int) -> dict:
  import importlib.util
  import types

  import torch
  import transformers

  base, sr = _demo_configs()
  spec = importlib.util.find_spec("imagen_pytorch")
  stub = types.ModuleType("imagen_pytorch")
  stub.__path__ = list(spec.submodule_search_locations)
  sys.modules["imagen_pytorch"] = stub
  import imagen_pytorch.t5 as ip_t5  # the hub is unreachable: a local config
  ip_t5.T5_CONFIGS[ip_t5.DEFAULT_T5_NAME] = dict(
      config=transformers.T5Config(d_model=int(base.model.text_dim)))
  del sys.modules["imagen_pytorch"]
  from imagen_pytorch import Imagen, Unet

  torch.set_num_threads(os.cpu_count())

  def unet(cfg, lowres):
    m = cfg.model
    return Unet(dim=int(m.base_channels), dim_mults=tuple(m.channel_mult),
                num_resnet_blocks=tuple(m.num_res_blocks),
                layer_attns=tuple(m.self_attn),
                layer_cross_attns=tuple(m.cross_attn),
                attn_dim_head=int(m.head_dim),
                attn_heads=max(int(m.cond_dim) // int(m.head_dim), 2),
                text_embed_dim=int(m.text_dim), cond_dim=int(m.cond_dim),
                channels=3, memory_efficient=bool(m.efficient),
                lowres_cond=lowres, init_conv_to_final_conv_residual=False)

  unets = (unet(base, False), unet(sr, True))
  imagen = Imagen(unets=unets, image_sizes=(int(base.resolution), int(sr.resolution)),
                  timesteps=steps, text_embed_dim=int(base.model.text_dim),
                  cond_drop_prob=0.1, dynamic_thresholding=True,
                  lowres_sample_noise_level=0.1).eval()
  text = torch.randn(batch, TEXT_LEN, int(base.model.text_dim))
  mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)

  def run():
    with torch.no_grad():
      # one cond_scale for both stages is imagen-pytorch's API; the mean of
      # ours keeps the work identical (guidance costs the same at any scale)
      return imagen.sample(text_embeds=text, text_masks=mask,
                           cond_scale=sum(GUIDANCE) / 2, batch_size=batch,
                           use_tqdm=False)

  secs = common.time_call(run, repeats=2, warmup=1)
  return dict(secs=secs, params=[sum(p.numel() for p in u.parameters())
                                 for u in unets])


IF_TINY = dict(
    _class_name="UNet2DConditionModel", sample_size=16, layers_per_block=1,
    block_out_channels=[32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
    attention_head_dim=8, addition_embed_type="text",
    addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8)
IF_TEXT_LEN = 77
IF_GUIDANCE = 7.0


def _if_config(name: str) -> dict:
  from imagen_jax import convert_if
  return IF_TINY if name == "tiny" else convert_if.IF_CONFIGS[name]


def _if_jax_worker(name: str, batch: int, timesteps: str,
                   kernels: str = "auto") -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from imagen_jax import build, convert_if
  from imagen_jax.models.unet import UNet
  from imagen_jax.stage import SampleInputs, Stage, StageSettings

  cfg = _if_config(name)
  fields = convert_if.unet_config_to_model(cfg)
  res = fields.pop("resolution")
  on_cpu = jax.devices()[0].platform == "cpu"
  unet = UNet(**fields, dtype="float32" if on_cpu else "bfloat16",
              kernels=kernels)
  stage = Stage(unet=unet, resolution=res, schedule="discrete_cosine")
  text = jax.random.normal(jax.random.PRNGKey(1),
                           (batch, IF_TEXT_LEN, fields["text_dim"]))
  mask = jnp.ones((batch, IF_TEXT_LEN), bool)
  params = nn.unbox(jax.jit(unet.init)(
      jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), jnp.zeros((1,)),
      text[:1], mask[:1])["params"])
  settings = StageSettings(sampler="ancestral", timesteps=timesteps,
                           guidance_scale=IF_GUIDANCE, threshold="dynamic",
                           percentile=95.0, threshold_max=1.5)
  run = jax.jit(stage.uint8_sampler(settings))
  inputs = SampleInputs(text, mask, negative_text=jnp.zeros_like(text),
                        negative_mask=mask)

  def call(seed):
    return run(params, inputs, jax.random.PRNGKey(seed)).block_until_ready()

  t = time.perf_counter()
  call(0)
  first = time.perf_counter() - t
  secs = common.time_call(lambda: call(1), repeats=3, warmup=0)
  return dict(secs=secs, compile_s=first - secs,
              params=[build.count_params(params)])


def _if_torch_worker(name: str, batch: int, timesteps: str,
                     kernels: str = "") -> dict:
  del kernels  # diffusers picks its own attention (SDPA)
  import diffusers
  import torch
  from imagen_jax.diffusion import discrete

  cfg = {k: v for k, v in _if_config(name).items() if not k.startswith("_")}
  cuda = torch.cuda.is_available()
  device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
  torch.set_num_threads(os.cpu_count())
  # Initialised where it runs: IF-I-XL's 4.3B float32 weights take minutes
  # to initialise on the host and then to copy.
  with torch.device(device):
    unet = diffusers.UNet2DConditionModel(**cfg)
  unet = unet.to(dtype).eval()
  pipe = diffusers.IFPipeline(
      unet=unet, scheduler=diffusers.DDPMScheduler(
          num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
          thresholding=True, dynamic_thresholding_ratio=0.95,
          sample_max_value=1.5, variance_type="learned_range"),
      tokenizer=None, text_encoder=None, safety_checker=None,
      feature_extractor=None, watermarker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  text = torch.randn(batch, IF_TEXT_LEN, cfg["encoder_hid_dim"], device=device,
                     dtype=dtype)
  steps = discrete.respaced_steps(timesteps)
  res = int(cfg["sample_size"])

  def run():
    with torch.no_grad():
      out = pipe(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text),
                 timesteps=steps, guidance_scale=IF_GUIDANCE, output_type="pt",
                 height=res, width=res).images
    if cuda:
      torch.cuda.synchronize()
    return out

  secs = common.time_call(run, repeats=2, warmup=1)
  return dict(secs=secs, params=[sum(p.numel() for p in unet.parameters())])


def _run_worker(kind: str, batch: int, steps, extra=()) -> dict:
  return common.run_worker(__file__, ["--worker", kind, "--batch", str(batch),
                                      "--steps", str(steps), *extra])


def _if_rows(args) -> tuple[list, int]:
  """IF stage I rows: ours per kernel choice, diffusers after the first.

  Returns:
    The rows that completed, and how many jobs failed.
  """
  from imagen_jax.diffusion import discrete
  n = len(discrete.respaced_steps(args.if_timesteps))
  extra = ("--if_model", args.if_model, "--if_timesteps", args.if_timesteps)
  choices = args.if_kernels.split(",")
  jobs = [("if_jax", c) for c in choices[:1]]
  jobs += [] if args.no_diffusers else [("if_torch", "")]
  jobs += [("if_jax", c) for c in choices[1:]]
  rows, first, failed = [], None, 0
  for kind, kernels in jobs:
    try:
      res = _run_worker(kind, args.batch, 0, extra + ("--if_kernels", kernels))
    except RuntimeError as e:
      print(f"IF row {kind} {kernels} failed: {str(e)[-1500:]}", flush=True)
      failed += 1
      continue
    first = first or res["secs"]
    if kind == "if_jax":
      row = [f"imagen_jax IF stage I ({args.if_model}, kernels={kernels})", n,
             res["params"][0], res["secs"], args.batch / res["secs"],
             res["compile_s"], "-", res["rss"] / 2**20]
    else:
      row = ["  diffusers IFPipeline same U-Net", n, res["params"][0],
             res["secs"], args.batch / res["secs"], "-", "-",
             res["rss"] / 2**20]
    row.append(f"{res['secs'] / first:.2f}")
    print("IF row: " + " | ".join(map(str, row)), flush=True)
    rows.append(row)
  return rows, failed


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", default="25,100")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--worker", default=None)
  parser.add_argument("--if_model", default="",
                      help="Also time IF's stage I: tiny | IF-I-XL (GPU).")
  parser.add_argument("--if_timesteps", default="smart27")
  parser.add_argument("--if_only", action="store_true",
                      help="Only the IF rows.")
  parser.add_argument("--if_kernels", default="auto",
                      help="Comma-separated model.kernels choices, one IF row "
                      "each (diffusers' row follows the first).")
  parser.add_argument("--no-diffusers", action="store_true",
                      help="Skip diffusers' IF row.")
  args = parser.parse_args()
  if args.worker:
    if args.worker.startswith("if_"):
      fn = _if_jax_worker if args.worker == "if_jax" else _if_torch_worker
      result = fn(args.if_model, args.batch, args.if_timesteps,
                  args.if_kernels)
    else:
      fn = _jax_worker if args.worker == "jax" else _torch_worker
      result = fn(args.batch, int(args.steps))
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))
    return
  print(common.machine_line())
  rows, failed = [], 0
  if args.if_model:
    rows, failed = _if_rows(args)
  for steps in ([] if args.if_only else
                (int(s) for s in args.steps.split(","))):
    ours = _run_worker("jax", args.batch, steps)
    rows.append(["imagen_jax cascade", steps, "/".join(map(str, ours["params"])),
                 ours["secs"], args.batch / ours["secs"], ours["compile_s"],
                 ours["lowerings"], ours["rss"] / 2**20, "1.00"])
    if not args.no_torch:
      theirs = _run_worker("torch", args.batch, steps)
      rows.append(["  imagen-pytorch same U-Nets", steps,
                   "/".join(map(str, theirs["params"])), theirs["secs"],
                   args.batch / theirs["secs"], "-", "-", theirs["rss"] / 2**20,
                   f"{theirs['secs'] / ours['secs']:.2f}"])
  if args.if_model:
    print(f"\nIF rows: stage I alone, {args.if_timesteps} respacing, batch "
          f"{args.batch}, guidance {IF_GUIDANCE}, random weights, text "
          "embeddings given (no T5). Last column: its time / the first IF "
          "row's time.")
  if not args.if_only:
    print(f"\nFull cascade 16px base -> 64px SR, batch {args.batch}, guidance "
          f"{GUIDANCE[0]}/{GUIDANCE[1]}, ancestral sampler, random weights. "
          "Last column: its time / our time (our speed-up).")
  common.print_table(["pipeline", "steps/stage", "params base/SR", "s/batch",
                      "images/s", "compile s", "lowerings on 2nd call",
                      "peak RSS MiB", "speed-up"], rows)
  if failed:
    sys.exit(f"{failed} IF row(s) failed (above).")


if __name__ == "__main__":
  main()
