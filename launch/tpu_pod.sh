#!/usr/bin/env bash
# Runs an imagen_jax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--create --accelerator=v4-512]
#                     [--version=tpu-ubuntu2204-base] [--repo=GIT_URL] [--dry-run]
#                     -- imagen-train --config=configs/base64.py --workdir=gs://BUCKET/base64
#
# Steps: (create the slice), put the code on every worker (git clone of --repo,
# else a copy of this checkout), install it with jax[tpu], run the command on
# all workers at once. jax finds its peers on a TPU pod by itself.
set -euo pipefail
DRY=0; CREATE=0; TPU=""; ZONE=""; PROJECT=""; ACCEL="v4-8"; VERSION="tpu-ubuntu2204-base"; REPO=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --create) CREATE=1; shift ;;
    --tpu=*) TPU="${1#*=}"; shift ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --accelerator=*) ACCEL="${1#*=}"; shift ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --repo=*) REPO="${1#*=}"; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "tpu_pod.sh: --tpu=NAME and --zone=ZONE are required" >&2; exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "tpu_pod.sh: no command after --" >&2; exit 2
fi
GC=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
run() { if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
REMOTE_DIR='~/imagen_jax'
if [[ $CREATE -eq 1 ]]; then
  run "${GC[@]}" create "$TPU" "${COMMON[@]}" --accelerator-type="$ACCEL" --version="$VERSION"
fi
if [[ -n "$REPO" ]]; then
  run "${GC[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all \
    --command="rm -rf $REMOTE_DIR && git clone --depth 1 $REPO $REMOTE_DIR"
else
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  run "${GC[@]}" scp --recurse "$ROOT" "$TPU:$REMOTE_DIR" "${COMMON[@]}" --worker=all
fi
run "${GC[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all \
  --command="pip install -q -U 'jax[tpu]' && pip install -q -e $REMOTE_DIR"
USER_CMD="$(printf '%q ' "$@")"
run "${GC[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all \
  --command="cd $REMOTE_DIR && $USER_CMD"
