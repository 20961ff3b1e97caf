#!/usr/bin/env bash
# One training process on this machine.
#
#   launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/local.sh experiments/quickstart.py runs/quickstart --config.seed=1
#
# Running it again on the same WORKDIR resumes from the latest checkpoint; a finished run (one
# with summary.json) has nothing left to do. Exit status 75 means "stopped by SIGTERM after saving
# a checkpoint: relaunch to resume". A sweep is one process too: `cnnlab sweep --config C --root R`.
#
# Environment: CNNLAB (default: cnnlab, or .venv/bin/cnnlab when it exists), DRY_RUN=1 prints the
# command instead of running it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 2 ]; then
  sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
if [ -z "${CNNLAB:-}" ]; then
  if [ -x "$here/.venv/bin/cnnlab" ]; then CNNLAB=$here/.venv/bin/cnnlab; else CNNLAB=cnnlab; fi
fi
config=$1 workdir=$2
shift 2
cmd=($CNNLAB train --config "$config" --workdir "$workdir" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
