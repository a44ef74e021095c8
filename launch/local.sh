#!/usr/bin/env bash
# Multi-host on one machine: N processes on 127.0.0.1, CPU devices, gloo collectives.
#
#   launch/local.sh N --config=configs/synthetic.py:runlocal --workdir=/tmp/run [more flags]
#
# Environment:
#   DEVICES_PER_PROCESS  CPU devices per process (default 2)
#   XLA_FLAGS            kept; the device count above is appended
#   PORT                 coordinator port (default: a free one)
#   PYTHON               interpreter (default: python)
#   DRY_RUN=1            print the commands instead of running them
# Exits non-zero if any process does; a process whose peer died exits on its own
# within --config.distributed.heartbeat_timeout seconds.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N [dsf3n_jax.main flags...]  (N = number of processes, >= 1)" >&2
  exit 2
fi
n=$1
shift
devices=${DEVICES_PER_PROCESS:-2}
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# Paths in the flags are the caller's (relative ones from its working directory); the
# package is found from this checkout even where it is not installed.
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# glibc's malloc returns XLA's large buffers to the kernel after every step; huge
# pages keep them (README "Performance"). glibc < 2.35 ignores the tunable.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

pids=()
signalled=0
# shellcheck disable=SC2329  # called by the trap
cleanup() {
  signalled=1
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < n; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
       "$python" -m dsf3n_jax.main "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$n" "--process_id=$i" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    continue
  fi
  "${cmd[@]}" &
  pids+=($!)
done

# The first failing process's status (75 when the run was preempted and saved: rerun to resume).
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  # A signal the trap forwards ends `wait` at once (status 128 + signal) while the process
  # still saves its checkpoint: wait again for its own status (127: the status had been
  # the process's own, e.g. killed by the signal).
  while [[ $signalled == 1 && $code -gt 128 ]]; do
    signalled=0
    again=0
    wait "$pid" || again=$?
    if [[ $again == 127 ]]; then
      break
    fi
    code=$again
  done
  if [[ $status == 0 && $code != 0 ]]; then
    status=$code
  fi
done
exit "$status"
