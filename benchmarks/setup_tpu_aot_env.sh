#!/usr/bin/env bash
# Builds an environment that can compile for TPU ahead of time on a machine
# without one: imagen_jax plus the libtpu wheel that jax's "tpu" extra pins.
# jax then lowers and compiles for a named topology (e.g. v5p:2x2x2) through
# jax.experimental.topologies; nothing runs on a TPU. Kept apart from the test
# environment because an installed libtpu makes every jax start probe for TPU.
#   bash benchmarks/setup_tpu_aot_env.sh [VENV_DIR]   (default: .tpu-aot-venv)
#   .tpu-aot-venv/bin/python benchmarks/train_speed.py --only-paper \
#       --paper-topology=v5p:2x2x2
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.tpu-aot-venv}
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e .
# The libtpu version that this jax's [tpu] extra names (not the newest one).
LIBTPU=$(python - <<'PY'
import importlib.metadata as m
req = [r for r in m.requires("jax") if r.startswith("libtpu") and "tpu" in r]
print(req[0].split(";")[0].replace(" ", ""))
PY
)
python -m pip install -q --no-deps "$LIBTPU"
echo "TPU AOT env ready ($LIBTPU): source $VENV/bin/activate"
