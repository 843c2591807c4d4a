#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh CONFIG [overrides...]
#
#   NPROC=8 launch/torchrun.sh configs/vit-b-32-laion.yaml output_dir=/runs/b32
#
# Environment:
#   NPROC            processes on this node (default: number of GPUs, else 2)
#   PYTHON           interpreter (default: python)
#   SAVE_TIMEOUT     seconds torchrun waits for the workers to save after forwarding a stop signal,
#                    before it kills them (default 300)
# Stopping: send SIGTERM or SIGUSR1 to this script's torchrun (or `touch OUTPUT_DIR/STOP`): the workers
# finish the current step, save a checkpoint and exit 75; run the same command again to resume.
set -euo pipefail
usage() {
  # this header (the comment block above), without its '# ', then the trainer's own arguments
  sed -n '2,/^$/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
  echo "Trainer options (config sections, outputs, exit codes): python -m mmpretrain.train --help"
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac
if [ -z "${NPROC:-}" ]; then
  NPROC=$("${PYTHON:-python}" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec "${PYTHON:-python}" -m torch.distributed.run \
  --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout="${SAVE_TIMEOUT:-300}" \
  -m mmpretrain.train "$@"
