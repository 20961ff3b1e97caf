#!/usr/bin/env bash
# The same cnnlab command on every worker of a Cloud TPU pod slice. jax.distributed.initialize
# finds the pod by itself, so every worker runs the identical command line.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh train \
#     --config experiments/imagenet_resnet50.py --workdir /mnt/shared/runs/r50
#   # a sweep: one point at a time over the whole pod
#   N=$(cnnlab sweep --config experiments/ablation_kernel_stride_pool.py --root R --count)
#   for i in $(seq 0 $((N - 1))); do
#     TPU=... ZONE=... launch/tpu_pod.sh sweep --config experiments/ablation_kernel_stride_pool.py \
#       --root /mnt/shared/runs/ablation --index "$i"
#   done
#
# The repository (with its .venv) must be at REMOTE_DIR on every worker, and the workdir or root on
# storage all workers share (NFS or Filestore). Relaunching the same command resumes; exit status 75
# means a worker was asked to stop (preemption) after saving a checkpoint.
#
# Environment: TPU, ZONE (required), PROJECT (optional), REMOTE_DIR (default: ~/cnnlab),
# DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
: "${TPU:?set TPU=the TPU VM name}" "${ZONE:?set ZONE=its zone}"
remote_dir=${REMOTE_DIR:-'~/cnnlab'}
args=$(printf ' %q' "$@")
remote="cd $remote_dir && .venv/bin/cnnlab$args"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote")
[ -z "${PROJECT:-}" ] || cmd+=(--project "$PROJECT")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
