#!/bin/sh
# Container entrypoint: `train`, `serve`, or any other command.
#
# SageMaker starts training containers with `train` and serving containers with `serve`. Some
# launchers (SageMaker SDK v3 local mode) pass no argument at all: then the mode is inferred
# from SageMaker's training configuration files being present. Flags alone (`--epochs 5`) are
# training flags, so `docker compose run --rm train --epochs 5` works.
set -eu
base_dir=${SAGEMAKER_BASE_DIR:-/opt/ml}

case "${1:-}" in
  train) shift; exec python -m train "$@" ;;
  serve) shift; exec python -m serve "$@" ;;
  -*) exec python -m train "$@" ;;
  "")
    if [ -e "$base_dir/input/config/hyperparameters.json" ] \
      || [ -e "$base_dir/input/config/inputdataconfig.json" ] \
      || [ -e "$base_dir/input/config/resourceconfig.json" ]; then
      exec python -m train
    fi
    exec python -m serve ;;
  *) exec "$@" ;;
esac
