#!/usr/bin/env bash
# Runs an imagen_jax command on this machine.
#
#   launch/local.sh [--dry-run] [--cpu-devices=N] -- imagen-train --config=configs/tiny.py --workdir=/tmp/tiny
#
# --cpu-devices=N simulates N devices on the CPU (to try a mesh without accelerators).
set -euo pipefail
DRY=0
CPU_DEVICES=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --cpu-devices=*) CPU_DEVICES="${1#*=}"; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "local.sh: unknown option $1 (options before --, the command after it)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local.sh: no command; e.g. launch/local.sh -- imagen-train --config=configs/tiny.py --workdir=/tmp/tiny" >&2
  exit 2
fi
ENV=()
if [[ -n "$CPU_DEVICES" ]]; then
  ENV=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${CPU_DEVICES} ${XLA_FLAGS:-}")
fi
CMD=("${ENV[@]}" "$@")
if [[ $DRY -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
