#!/usr/bin/env bash
# The checks and benchmarks that need an accelerator, in parts that each fit
# one lease call (see benchmarks/RESULTS.md for what they printed).
#
#   bash benchmarks/accelerator_run.sh PART [OUT_DIR]
#
# PART:
#   speed   unet_speed (ours vs imagen-pytorch, float32 and bfloat16) and
#           train_speed's CPU-scale rows + checkpoint stall, on the accelerator
#   paper   real train steps of the paper base stage (2.0B) at per-device
#           batch 32, remat full then none: step time, MFU, device peak memory
#   tests   the model / numerics test files on the accelerator
#
# The machine needs jax with its accelerator plugin, flax, optax, orbax, and
# for imagen-pytorch torch + torchvision. Packages it lacks can be carried as
# wheels in .whl/ (Python 3.12 x86-64; see the device tool's README): they are
# installed into /tmp/site first. Nothing here is needed by CI.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: accelerator_run.sh speed|paper|tests [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/accelerator_out}}
mkdir -p "$OUT_DIR"
case "$PART" in speed|paper|tests) ;; *)
  echo "unknown part '$PART': choose speed, paper or tests" >&2; exit 2;; esac
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# Compiled programs survive between parts on the same (warm) machine.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

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
          | tee "$OUT_DIR/unet_${dtype}_b${batch}.txt" | tail -6
      done
    done
    timeout 240 "$PY" benchmarks/train_speed.py --skip-paper \
      --dtype float32,bfloat16 2>&1 | tee "$OUT_DIR/train_cpu_scale.txt"
    ;;
  paper)
    # One process per remat policy: a device's peak-memory counter never
    # goes down. Let XLA's allocator use up to 95% of the card (default 75%).
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}
    for remat in ${REMAT:-full none}; do
      timeout "${PAPER_TIMEOUT:-280}" "$PY" benchmarks/train_speed.py \
        --only-paper --skip-paper --paper-run --remat "$remat" \
        --paper-batch "${PAPER_BATCH:-32}" 2>&1 \
        | tee "$OUT_DIR/paper_run_$remat.txt" | tail -5
    done
    ;;
  tests)
    # conftest pins CPU unless told otherwise: let the accelerator be default.
    JAX_PLATFORMS="" CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} \
      timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest -q -x \
      -p no:cacheprovider tests/test_unet.py tests/test_group_norm.py \
      tests/test_optim.py tests/test_diffusion_math.py tests/test_samplers.py \
      2>&1 | tee "$OUT_DIR/tests.txt" | tail -30
    ;;
esac
