#!/usr/bin/env bash
# The checks and benchmarks that need an accelerator, in parts that each fit
# one lease call (see benchmarks/RESULTS.md for what they printed).
#
#   bash benchmarks/accelerator_run.sh PART [OUT_DIR]
#
# PART (each about one 10-minute call on an H100, whose XLA compiles with
# autotuning take 1-3 min per program at paper scale):
#   speed   unet_speed (ours vs imagen-pytorch, float32 and bfloat16, batch 8
#           and 32): ~6 min
#   train   train_speed's CPU-scale rows (bf16) + checkpoint stall
#   paper   real train steps of the paper base stage (2.0B) at per-device
#           batch 32: step time, MFU, device peak memory. REMAT="none" by
#           default (~4 min); remat=full compiles for over 5 min: give it its
#           own call (REMAT=full PAPER_TIMEOUT=560).
#   kernels the kernel A/B (imagen_jax.kernels: reference = plain XLA,
#           xla_cpu = the CPU rewrites, cudnn = cuDNN fused attention), each
#           implementation one worker, timed interleaved: the CPU-scale base
#           U-Net (bfloat16 and float32, batch 32, ~3 min) and the paper-scale
#           base stage (bfloat16, batch PAPER_BATCH=2 per worker so that the
#           three workers fit an H100 together, ~6 min with its compiles);
#           KERNELS_PAPER=0 skips the paper rows, KERNELS_CPU=0 the others
#   if      DeepFloyd IF-I-XL (4.3B, random weights) sampled by ours
#           (bfloat16, kernels IF_KERNELS=cudnn,reference) and by diffusers'
#           IFPipeline (float16), smart27, batch IF_BATCH=4, guidance 7: the
#           images/s row of issue 24 (~8 min: two 4.3B inits and compiles)
#   tests   the model / numerics test files on the accelerator (> 4 min)
#   wheels  run on the machine that has the network, not the accelerator:
#           downloads into .whl/ the Python 3.12 x86-64 wheels that the lent
#           GPU image lacks (ml_collections, imagen-pytorch, diffusers and
#           their needs; numpy and torch are the image's own)
#
# SMOKE=1 runs the kernels and if parts on tiny stand-ins (the tiny U-Net,
# one round, bfloat16; IF's tiny stage I), on any machine in about a minute
# each: a check that the parts work (tests/test_accelerator_run.py), whose
# figures mean nothing.
#
# The machine needs jax with its accelerator plugin, flax, optax, orbax, and
# for imagen-pytorch torch + torchvision. Packages it lacks are carried as
# wheels in .whl/: they are installed into /tmp/site first. Nothing here is
# needed by CI.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: accelerator_run.sh speed|train|paper|kernels|if|tests|wheels [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/accelerator_out}}
mkdir -p "$OUT_DIR"
case "$PART" in speed|train|paper|kernels|if|tests|wheels) ;; *)
  echo "unknown part '$PART': choose speed, train, paper, kernels, if, tests or wheels" >&2
  exit 2;; esac
if [ "$PART" = wheels ]; then
  platforms=""
  for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 \
           manylinux2014 manylinux1; do
    platforms+=" --platform ${p}_x86_64"
  done
  for pkg in ml_collections==1.1.0 imagen-pytorch==2.1.0 beartype==0.23.1 \
             ema-pytorch==0.8.3 kornia==0.9.0 kornia_rs==0.2.0 \
             pytorch-warmup==0.2.0 pydantic==2.14.3 pydantic_core==2.50.4 \
             annotated-types==0.8.0 typing-inspection==0.4.5 datasets==5.2.0 \
             dill==0.4.1 multiprocess==0.70.19 \
             diffusers==0.42.1 huggingface_hub==2.4.0 hf-xet==1.8.0 \
             click==8.5.1 httpx2==2.17.0 httpcore2==2.17.0 anyio==4.16.0 \
             idna==3.21 truststore==0.10.5 h11==0.16.0 \
             certifi==2026.10.19.post1 safetensors==0.8.0 regex==2026.12.2 \
             importlib_metadata==10.2.0 zipp==4.1.2 PyYAML==6.0.4 \
             tqdm==4.70.1 typing_extensions==4.16.0 packaging==26.4 \
             filelock==4.3.2 fsspec==2026.9.0 pillow==13.0.0 \
             requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3; do
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp $platforms -d .whl "$pkg" \
      || exit 1
  done
  exit 0
fi
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  : "${KERNELS_CONFIG:=tiny}" "${KERNELS_BATCH:=2}" "${KERNELS_ROUNDS:=1}"
  : "${KERNELS_DTYPES:=bfloat16}" "${KERNELS_PAPER:=0}"
  : "${IF_MODEL:=tiny}" "${IF_BATCH:=1}"
fi
# The wheels are the lent image's Python 3.12 ones: elsewhere (a smoke run
# of a part on this machine) the environment's own packages serve.
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site ] \
   && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# Compiled programs survive between parts on the same (warm) machine.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
# A failed step does not stop the part (the others still measure); the exit
# status says whether any failed.
status=0

case "$PART" in
  speed)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
      --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"
    "$PY" -c "import jax, flax, optax, orbax.checkpoint as o, torch; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'orbax', o.__version__, 'torch', torch.__version__); \
print(jax.devices())" 2>&1 | tee -a "$OUT_DIR/gpu.txt"
    for dtype in float32 bfloat16; do
      for batch in 8 32; do
        timeout 150 "$PY" benchmarks/unet_speed.py --configs cpu \
          --dtype "$dtype" --batch "$batch" 2>&1 \
          | tee "$OUT_DIR/unet_${dtype}_b${batch}.txt" | tail -6 || status=1
      done
    done
    ;;
  train)
    timeout "${TRAIN_TIMEOUT:-560}" "$PY" benchmarks/train_speed.py \
      --skip-paper --dtype "${TRAIN_DTYPES:-bfloat16}" 2>&1 \
      | tee "$OUT_DIR/train_cpu_scale.txt" | tail -20 || status=1
    ;;
  paper)
    # One process per remat policy: a device's peak-memory counter never
    # goes down. Let XLA's allocator use up to 95% of the card (default 75%).
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}
    for remat in ${REMAT:-none}; do
      timeout "${PAPER_TIMEOUT:-280}" "$PY" benchmarks/train_speed.py \
        --only-paper --skip-paper --paper-run --remat "$remat" \
        --paper-batch "${PAPER_BATCH:-32}" 2>&1 \
        | tee "$OUT_DIR/paper_run_$remat.txt" | tail -5 || status=1
    done
    ;;
  kernels)
    nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"
    # Several workers share the card: each takes what it needs, not 75%.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    if [ "${KERNELS_CPU:-1}" != 0 ]; then
      for dtype in ${KERNELS_DTYPES:-bfloat16 float32}; do
        timeout 200 "$PY" benchmarks/unet_speed.py \
          --configs "${KERNELS_CONFIG:-cpu}" --no-torch --dtype "$dtype" \
          --batch "${KERNELS_BATCH:-32}" --kernels reference,xla_cpu,cudnn \
          --rounds "${KERNELS_ROUNDS:-8}" --steps 4 2>&1 \
          | tee "$OUT_DIR/kernels_${KERNELS_CONFIG:-cpu}_${dtype}_b${KERNELS_BATCH:-32}.txt" | tail -9 || status=1
      done
    fi
    if [ "${KERNELS_PAPER:-1}" != 0 ]; then
      timeout "${PAPER_TIMEOUT:-400}" "$PY" benchmarks/unet_speed.py \
        --configs paper --no-torch --dtype bfloat16 \
        --batch "${PAPER_BATCH:-2}" --kernels reference,cudnn,xla_cpu \
        --rounds 4 --steps 2 2>&1 \
        | tee "$OUT_DIR/kernels_paper_bfloat16.txt" | tail -9 || status=1
    fi
    ;;
  if)
    nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    timeout "${IF_TIMEOUT:-560}" "$PY" benchmarks/sample_speed.py \
      --if_model "${IF_MODEL:-IF-I-XL}" --if_only \
      --if_kernels "${IF_KERNELS:-cudnn,reference}" \
      --batch "${IF_BATCH:-4}" 2>&1 | tee "$OUT_DIR/if_sample_speed.txt" \
      | grep -v "^WARNING" | tail -12 || status=1
    ;;
  tests)
    # conftest pins CPU unless told otherwise: let the accelerator be default.
    JAX_PLATFORMS="" CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} \
      timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest -q -x \
      -p no:cacheprovider tests/test_unet.py tests/test_kernels.py tests/test_compat.py \
      tests/test_optim.py tests/test_diffusion_math.py tests/test_samplers.py \
      2>&1 | tee "$OUT_DIR/tests.txt" | tail -30 || status=1
    ;;
esac
exit $status
