#!/usr/bin/env bash
# Run the whole test suite: unit and in-process tests, a real uvicorn server, and the real
# Docker images (built here, or reused when the tree has not changed since they were built).
#
#   bash tests/run.sh [pytest args]        e.g. bash tests/run.sh -m "not container"
#
# Needs Python 3.11+ and a running Docker engine with BuildKit (see README). Env:
#   BASE_IMAGE       base for the images (default python:3.11-slim-bookworm; when that cannot be
#                    pulled, a local one is built with container/build-base.sh)
#   TORCH_INDEX_URL  torch wheel index for the CPU image (default: PyTorch's CPU-only index)
#   PYTHON           interpreter for the test environment (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
python=${PYTHON:-python3}
stamp=$venv/.installed
want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "tests: preparing $venv" >&2
  [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -c requirements/constraints.txt -e '.[serve,train,deploy,test]'
  echo "$want" > "$stamp"
fi

docker info >/dev/null 2>&1 || { echo "tests: no Docker engine answers (start dockerd; see README)" >&2; exit 1; }
if [[ -z ${BASE_IMAGE:-} ]]; then
  BASE_IMAGE=python:3.11-slim-bookworm
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "tests: $BASE_IMAGE cannot be pulled; building a local base image" >&2
    BASE_IMAGE=$(container/build-base.sh)
  fi
fi
export BASE_IMAGE
CLASSIFIER_IMAGE_CPU=$(container/build-image.sh cpu)
CLASSIFIER_IMAGE_GPU=$(container/build-image.sh gpu)
export CLASSIFIER_IMAGE_CPU CLASSIFIER_IMAGE_GPU CLASSIFIER_REQUIRE_CONTAINERS=1
echo "tests: images $CLASSIFIER_IMAGE_CPU $CLASSIFIER_IMAGE_GPU" >&2

exec "$venv/bin/python" -m pytest "$@"
