#!/usr/bin/env bash
# Builds the benchmark environment: imagen_jax plus imagen-pytorch (which needs
# torch + torchvision, a multi-GB install kept out of the test extras).
#   bash benchmarks/setup_bench_env.sh [VENV_DIR]   (default: .bench-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.bench-venv}
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# On x86-64 this pair installs together from PyPI (torch 2.13.0's CPU wheel
# does not import beside PyPI's torchvision).
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q imagen-pytorch
python -m pip install -q -e .
echo "benchmark env ready: source $VENV/bin/activate"
