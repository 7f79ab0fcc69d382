#!/bin/sh
# Container entrypoint: `train`, `serve`, or any other command.
#
# SageMaker starts training containers with `train` and serving containers with `serve`. Some
# launchers (SageMaker SDK v3 local mode) pass no argument at all: then the mode is inferred
# from SageMaker's training configuration files being present. Flags alone (`--epochs 5`) are
# training flags, so `docker compose run --rm train --epochs 5` works.
set -eu
base_dir=${SAGEMAKER_BASE_DIR:-/opt/ml}

# As an unprivileged user (`--user 1000:1000`) or on a read-only root filesystem the home folder
# is missing or read-only: caches (pip, PyTorch, CUDA's kernels) then go under the temporary folder.
if [ ! -w "${HOME:-/}" ]; then
  HOME=${TMPDIR:-/tmp}/home
  export HOME
  mkdir -p "$HOME" 2>/dev/null || :
fi

# Training writes into these. A host folder Docker created for a missing bind mount belongs to
# root, which an unprivileged user cannot write to: say so now, not when the model is saved.
check_writable() {
  for folder in "${SM_MODEL_DIR:-$base_dir/model}" "${SM_OUTPUT_DIR:-$base_dir/output}" \
                "${SM_CHECKPOINT_DIR:-$base_dir/checkpoints}"; do
    if [ -d "$folder" ] && [ ! -w "$folder" ]; then
      echo "train: $folder is not writable by uid $(id -u) (it belongs to $(stat -c %u:%g "$folder")):" \
           "give the host folder to that user (sudo chown -R $(id -u):$(id -g) FOLDER), or run the" \
           "container as the folder's owner (docker run --user UID:GID; docker compose reads" \
           "CLASSIFIER_UID and CLASSIFIER_GID)" >&2
      exit 1
    fi
  done
}

case "${1:-}" in
  train) shift; check_writable; exec python -m train "$@" ;;
  serve) shift; exec python -m serve "$@" ;;
  -*) check_writable; exec python -m train "$@" ;;
  "")
    if [ -e "$base_dir/input/config/hyperparameters.json" ] \
      || [ -e "$base_dir/input/config/inputdataconfig.json" ] \
      || [ -e "$base_dir/input/config/resourceconfig.json" ]; then
      check_writable
      exec python -m train
    fi
    exec python -m serve ;;
  *) exec "$@" ;;
esac
