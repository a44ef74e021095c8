#!/usr/bin/env bash
# Runs the training command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/run [--dry-run] [-- main flags]
#
# Every worker runs the same command; JAX finds the coordinator and the process
# ids from the TPU metadata, so no distributed flags are needed. The workdir must
# be shared by all workers (a gs:// bucket): orbax writes checkpoints there
# collectively, and only process 0 writes logs, metrics and results.
# Options:
#   --tpu NAME        TPU VM name (or $TPU_NAME)
#   --zone ZONE       zone (or $ZONE)
#   --project ID      project (or $PROJECT; default: gcloud's)
#   --workdir DIR     shared workdir (required)
#   --config FILE     config (default configs/vegas.py)
#   --repo DIR        checkout of this project on the workers (default ~/dsf3n_jax)
#   --setup           first install the project on every worker (python3 -m pip install -e .)
#   --retries N       rerun the command up to N times while it exits with status 75
#                     (preempted or told to stop by SIGTERM: a checkpoint was saved; the
#                     same command resumes from it). A slice that was deleted must be
#                     recreated first; then run this script again: it resumes too.
#   --dry-run         print the gcloud command instead of running it
set -euo pipefail

tpu=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
workdir=""
config=configs/vegas.py
repo=dsf3n_jax  # relative to the workers' home directory
setup=0
retries=0
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu=${1#*=} ;;
    --tpu) tpu=$2; shift ;;
    --zone=*) zone=${1#*=} ;;
    --zone) zone=$2; shift ;;
    --project=*) project=${1#*=} ;;
    --project) project=$2; shift ;;
    --workdir=*) workdir=${1#*=} ;;
    --workdir) workdir=$2; shift ;;
    --config=*) config=${1#*=} ;;
    --config) config=$2; shift ;;
    --repo=*) repo=${1#*=} ;;
    --repo) repo=$2; shift ;;
    --setup) setup=1 ;;
    --retries=*) retries=${1#*=} ;;
    --retries) retries=$2; shift ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for var in tpu zone workdir; do
  if [[ -z "${!var}" ]]; then
    echo "tpu_pod.sh: --$var is required" >&2
    exit 2
  fi
done

remote="cd $repo"
if [[ $setup == 1 ]]; then
  remote+=" && python3 -m pip install -q -e ."
fi
remote+=" && python3 -m dsf3n_jax.main --config=$config --workdir=$workdir --config.model.dtype=bfloat16"
for arg in "${extra[@]}"; do
  remote+=" $(printf '%q' "$arg")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote")
if [[ -n "$project" ]]; then
  cmd+=("--project=$project")
fi
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
attempt=0
while true; do
  status=0
  "${cmd[@]}" || status=$?
  if [[ $status -ne 75 || $attempt -ge $retries ]]; then
    exit "$status"
  fi
  attempt=$((attempt + 1))
  echo "tpu_pod.sh: preempted (status 75); resuming, attempt $attempt of $retries" >&2
done
