#!/usr/bin/env bash
# NPROC processes on this machine forming one jax.distributed job (data parallel over all of them).
#
#   launch/multiprocess.sh NPROC CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/multiprocess.sh 2 experiments/quickstart.py runs/mp --config.train.num_epochs=1
#
# Process i runs `cnnlab train ... --coordinator 127.0.0.1:PORT --num-processes NPROC
# --process-id i`, which calls jax.distributed.initialize. On CPU each process gets
# DEVICES_PER_PROCESS XLA devices (default: cores / NPROC, at least 1) through
# XLA_FLAGS=--xla_force_host_platform_device_count. Process 0 writes the workdir and prints to the
# terminal; process i>0 logs to WORKDIR/process_i.log. SIGTERM/SIGINT is passed on to every process
# (they agree on a step, save a checkpoint and exit 75); the script exits with the first non-zero
# status. Relaunching the same command resumes.
#
# Environment: PORT (default 12355 + a hash of WORKDIR), DEVICES_PER_PROCESS, CNNLAB,
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 3 ]; then
  sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
if [ -z "${CNNLAB:-}" ]; then
  if [ -x "$here/.venv/bin/cnnlab" ]; then CNNLAB=$here/.venv/bin/cnnlab; else CNNLAB=cnnlab; fi
fi
nproc_=$1 config=$2 workdir=$3
shift 3
cores=$(nproc)
devices=${DEVICES_PER_PROCESS:-$(( cores / nproc_ > 0 ? cores / nproc_ : 1 ))}
port=${PORT:-$(( 12355 + $(printf '%s' "$workdir" | cksum | cut -d' ' -f1) % 1000 ))}

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
[ -n "${DRY_RUN:-}" ] || mkdir -p "$workdir"
for (( i = 0; i < nproc_; i++ )); do
  cmd=(env "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
       $CNNLAB train --config "$config" --workdir "$workdir" --coordinator "127.0.0.1:$port"
       --num-processes "$nproc_" --process-id "$i" "$@")
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; [ "$i" -eq 0 ] && echo '&' || echo "> $workdir/process_$i.log 2>&1 &"
  elif [ "$i" -eq 0 ]; then
    "${cmd[@]}" &
    pids+=($!)
  else
    "${cmd[@]}" > "$workdir/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
[ -n "${DRY_RUN:-}" ] && { echo wait; exit 0; }
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process is gone.
  while true; do
    set +e; wait "$pid"; rc=$?; set -e
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
done
exit "$status"
