#!/usr/bin/env bash
# Submits an imagen_jax command to a SLURM GPU cluster.
#
#   launch/gpu_slurm.sh --nodes=4 --gpus-per-node=8 [--per-node] [--partition=P]
#                       [--time=48:00:00] [--job-name=imagen] [--dry-run]
#                       -- imagen-train --config=configs/sr256.py --workdir=/shared/sr256
#
# One process per GPU by default (srun starts nodes x gpus tasks, each sees
# its own GPU); --per-node starts one process per node that drives all its
# GPUs. jax.distributed.initialize() reads the coordinator, process count and
# index from SLURM's variables. --dry-run prints the batch script and the
# sbatch command instead of submitting.
set -euo pipefail
DRY=0; NODES=1; GPUS=8; PER_NODE=0; PARTITION=""; TIME="48:00:00"; NAME="imagen"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --nodes=*) NODES="${1#*=}"; shift ;;
    --gpus-per-node=*) GPUS="${1#*=}"; shift ;;
    --per-node) PER_NODE=1; shift ;;
    --partition=*) PARTITION="${1#*=}"; shift ;;
    --time=*) TIME="${1#*=}"; shift ;;
    --job-name=*) NAME="${1#*=}"; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_slurm.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "gpu_slurm.sh: no command after --" >&2; exit 2
fi
if [[ $PER_NODE -eq 1 ]]; then TASKS=1; GPUS_PER_TASK=$GPUS; else TASKS=$GPUS; GPUS_PER_TASK=1; fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
USER_CMD="$(printf '%q ' "$@")"
SCRIPT=$(cat <<EOS
#!/usr/bin/env bash
#SBATCH --job-name=${NAME}
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=${TASKS}
#SBATCH --gpus-per-node=${GPUS}
#SBATCH --cpus-per-task=8
#SBATCH --time=${TIME}
#SBATCH --requeue
#SBATCH --signal=TERM@120
${PARTITION:+#SBATCH --partition=${PARTITION}}
set -euo pipefail
cd ${ROOT}
# SIGTERM 120 s before the time limit: imagen-train saves and exits with 75;
# --requeue restarts the job, which resumes from that checkpoint.
srun --gpus-per-task=${GPUS_PER_TASK} --kill-on-bad-exit=1 ${USER_CMD}
EOS
)
if [[ $DRY -eq 1 ]]; then
  echo "$SCRIPT"
  echo "sbatch <the script above>"
  exit 0
fi
FILE=$(mktemp "${TMPDIR:-/tmp}/imagen_slurm.XXXXXX.sh")
echo "$SCRIPT" > "$FILE"
sbatch "$FILE"
