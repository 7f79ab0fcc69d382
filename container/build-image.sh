#!/usr/bin/env bash
# Build one image variant (cpu | gpu) and print its reference. The tag is derived from
# everything that goes into the image (Dockerfile, requirements, code, build args), so an
# unchanged tree reuses the image it built before instead of rebuilding it.
#
# Usage: container/build-image.sh cpu|gpu [--prune]     (--prune: remove older tags of the variant)
# Env:   IMAGE_NAME (default sagemaker-classifier), BASE_IMAGE, TORCH_INDEX_URL,
#        PLATFORM (default linux/amd64)
set -euo pipefail
cd "$(dirname "$0")/.."

variant=${1:?usage: container/build-image.sh cpu|gpu}
dockerfile=Dockerfile.$variant
[[ -f $dockerfile ]] || { echo "build-image: no $dockerfile (variants: cpu, gpu)" >&2; exit 2; }
name=${IMAGE_NAME:-sagemaker-classifier}
platform=${PLATFORM:-linux/amd64}

args=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}")
[[ -n ${TORCH_INDEX_URL:-} ]] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")

digest=$(
  {
    printf '%s\n' "$platform" "${args[@]}"
    find "$dockerfile" .dockerignore requirements container/entrypoint.sh classifier train serve \
      -type f \( -name '*.py' -o -name '*.html' -o -name '*.txt' -o -name '*.sh' -o -name 'Dockerfile.*' -o -name .dockerignore \) \
      -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-12
)
image="$name:$variant-$digest"

if ! docker image inspect "$image" >/dev/null 2>&1; then
  echo "build-image: building $image" >&2
  DOCKER_BUILDKIT=1 docker build --platform "$platform" -f "$dockerfile" "${args[@]}" -t "$image" . >&2
fi
if [[ ${2:-} == --prune ]]; then
  # Drop the tags of earlier builds of this variant (only safe while nothing else uses them).
  docker image ls --format '{{.Repository}}:{{.Tag}}' --filter "reference=$name:$variant-*" \
    | grep -vxF "$image" | xargs -r docker image rm >/dev/null 2>&1 || true
fi
echo "$image"
