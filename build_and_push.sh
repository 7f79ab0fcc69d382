#!/usr/bin/env bash
# Build the image variants for linux/amd64, tag them <version>-<variant>, <git sha>-<variant> and
# latest-<variant>, and push them to Amazon ECR (or any OCI registry with --registry).
# Run `./build_and_push.sh --help` for the flags.
set -euo pipefail

readonly PROG=build_and_push.sh
# Only builtins until docker is found, so a bare PATH still gets a clear message.
if [[ ${BASH_SOURCE[0]} == */* ]]; then ROOT=$(cd -- "${BASH_SOURCE[0]%/*}" && pwd); else ROOT=$PWD; fi
readonly ROOT
# Tags that may move, so they are excluded from the ECR repository's tag immutability.
readonly MUTABLE_TAG_FILTERS=("latest-*" "*-dirty-*")

usage() {
  cat <<'EOF'
Usage: ./build_and_push.sh [options] [cpu|gpu|both]

Build the image variant(s) (default: both) with container/build-image.sh for linux/amd64, tag
each image <version>-<variant>, <git sha>-<variant> and latest-<variant>, push the tags and print
the pushed image URIs on stdout, one per line (progress and the commands run go to stderr).

Target
  Amazon ECR (default): <account>.dkr.ecr.<region>.amazonaws.com/<repository>
    account  --account, else AWS_ACCOUNT_ID, else `aws sts get-caller-identity`
    region   --region, else AWS_REGION, else AWS_DEFAULT_REGION, else `aws configure get region`
    A missing repository is created with scan on push, a lifecycle policy that expires untagged
    images after --untagged-days days, and tag immutability IMMUTABLE_WITH_EXCLUSION: version and
    sha tags can never be overwritten, while latest-* and *-dirty-* (builds of a modified tree)
    may move. Where the AWS CLI or the region does not know that setting, the repository is
    created MUTABLE (with a warning) and only this script's check below protects version tags.
    Before building, the script refuses to reuse a <version>-<variant> or <sha>-<variant> tag
    that already exists in the repository (bump `version` in pyproject.toml), unless --force.
    An existing repository is used as it is. Docker logs in with `aws ecr get-login-password`.
  Any OCI registry: --registry HOST[:PORT][/NAMESPACE] pushes to HOST/.../<repository> instead;
    no AWS call is made and no tag is checked; log in first with `docker login HOST` if the
    registry needs it.

Options
  --registry HOST       push to this OCI registry instead of ECR (env REGISTRY)
  --repository NAME     repository name (default sagemaker-classifier; env REPOSITORY)
  --region REGION       AWS region (overrides AWS_REGION / AWS_DEFAULT_REGION / the profile)
  --account ID          AWS account id (env AWS_ACCOUNT_ID; default: from STS)
  --version VERSION     version tag (default: `version` in pyproject.toml)
  --base-image IMAGE    build arg BASE_IMAGE (env BASE_IMAGE; default python:3.11-slim-bookworm)
  --torch-index-url URL build arg TORCH_INDEX_URL (env TORCH_INDEX_URL; default: the Dockerfile's)
  --platform PLATFORM   build platform (env PLATFORM; default linux/amd64). SageMaker's x86
                        instances need linux/amd64: an arm64 image built on Apple silicon fails
                        there with "exec format error".
  --untagged-days N     lifecycle policy of a new ECR repository (default 14)
  --force               push even if the version or sha tag already exists in the ECR repository
                        (an immutable repository still refuses to overwrite it)
  --no-push             prepare the repository, build and tag, but do not log in or push
  --dry-run             print every command that would change something (repository creation,
                        build, tag, login, push) without running it; read-only queries (git, STS,
                        describe/list calls) still run, so the same checks apply
  -h, --help            show this help

Environment
  AWS_PROFILE, AWS_ACCESS_KEY_ID, ... and AWS_ENDPOINT_URL reach the AWS CLI as usual.
  IMAGE_NAME            local image name used by container/build-image.sh (sagemaker-classifier)

Git: the sha is `git rev-parse --short HEAD`; with uncommitted changes the script warns and tags
<sha>-dirty-<variant> instead. Outside a git checkout the sha tag is left out.

Exit status: 0 success, 1 failure (the reason on stderr), 2 usage error.
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }

# Print a command the way a shell would read it (on fd 3, the script's stderr, so that it shows
# even where the command's own stderr is captured), then run it unless this is a dry run.
run() {
  local arg line="+"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$line" >&3
  ((dry_run)) || "$@"
}

parse_args() {
  variant_arg=""
  registry=${REGISTRY:-}
  repository=${REPOSITORY:-sagemaker-classifier}
  region=""
  account=${AWS_ACCOUNT_ID:-}
  version=""
  platform=${PLATFORM:-linux/amd64}
  untagged_days=14
  force=0 no_push=0 dry_run=0
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --registry | --repository | --region | --account | --version | --base-image | \
        --torch-index-url | --platform | --untagged-days)
        [[ $# -ge 2 && -n ${2:-} ]] || usage_error "$1 needs a value"
        case $1 in
          --registry) registry=$2 ;;
          --repository) repository=$2 ;;
          --region) region=$2 ;;
          --account) account=$2 ;;
          --version) version=$2 ;;
          --base-image) export BASE_IMAGE=$2 ;;
          --torch-index-url) export TORCH_INDEX_URL=$2 ;;
          --platform) platform=$2 ;;
          --untagged-days) untagged_days=$2 ;;
        esac
        shift 2 ;;
      --force) force=1; shift ;;
      --no-push) no_push=1; shift ;;
      --dry-run) dry_run=1; shift ;;
      -*) usage_error "unknown option '$1'" ;;
      *)
        [[ -z $variant_arg ]] || usage_error "one variant argument only (cpu, gpu or both), got '$variant_arg' and '$1'"
        variant_arg=$1; shift ;;
    esac
  done
  case ${variant_arg:-both} in
    cpu | gpu) variants=("$variant_arg") ;;
    both) variants=(cpu gpu) ;;
    *) usage_error "unknown variant '$variant_arg' (cpu, gpu or both)" ;;
  esac
  [[ $repository =~ ^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$ ]] ||
    usage_error "invalid repository name '$repository' (lower-case letters, digits, . _ - /)"
  [[ $untagged_days =~ ^[1-9][0-9]*$ ]] || usage_error "--untagged-days must be a positive integer, got '$untagged_days'"
  [[ -z $registry || $registry != *://* ]] || usage_error "--registry takes a host, not a URL: '$registry'"
  registry=${registry%/}
}

require_docker() {
  command -v docker >/dev/null 2>&1 ||
    die "docker is not installed or not on PATH; install Docker (https://docs.docker.com/get-docker/)"
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "docker is installed but no Docker engine answers; start Docker (or check DOCKER_HOST and your permissions on its socket)"
}

read_version() {
  if [[ -z $version ]]; then
    version=$(awk -F'"' '/^version[[:space:]]*=/ {print $2; exit}' "$ROOT/pyproject.toml" 2>/dev/null || true)
    [[ -n $version ]] || die "no version = \"...\" line in $ROOT/pyproject.toml; pass --version"
  fi
  [[ $version =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die "version '$version' cannot be part of an image tag"
}

# Sets git_tag ("<sha>" or "<sha>-dirty"; empty outside a git checkout).
read_git_sha() {
  git_tag=""
  local sha changes
  if ! sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
    warn "$ROOT is not a git checkout (or git is missing): no <git sha> tag"
    return
  fi
  changes=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l || true)
  if ((changes > 0)); then
    warn "the working tree has $changes uncommitted change(s): the image is not commit $sha; tagging it $sha-dirty-<variant>"
    git_tag=$sha-dirty
  else
    git_tag=$sha
  fi
}

require_aws() {
  command -v aws >/dev/null 2>&1 ||
    die "the AWS CLI ('aws') is needed for ECR; install it (https://aws.amazon.com/cli/) or push elsewhere with --registry HOST"
}

resolve_region() {
  region=${region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-}}}
  if [[ -z $region ]]; then
    region=$(aws configure get region 2>/dev/null || true)
  fi
  [[ -n $region ]] ||
    die "no AWS region: pass --region, set AWS_REGION, or set one in your profile (aws configure set region ...)"
}

resolve_account() {
  if [[ -n $account ]]; then
    [[ $account =~ ^[0-9]{12}$ ]] || die "AWS account id must be 12 digits, got '$account'"
    return
  fi
  local error
  if ! account=$(aws sts get-caller-identity --region "$region" --query Account --output text 2>"$tmp/sts.err"); then
    error=$(tr -s '\n' ' ' <"$tmp/sts.err")
    die "no usable AWS credentials (aws sts get-caller-identity failed: ${error% }). Configure them (aws configure, AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, aws sso login) or push elsewhere with --registry HOST"
  fi
  [[ $account =~ ^[0-9]{12}$ ]] || die "unexpected account id from STS: '$account'"
}

ecr_host() {
  case $region in
    cn-*) printf '%s.dkr.ecr.%s.amazonaws.com.cn' "$account" "$region" ;;
    *) printf '%s.dkr.ecr.%s.amazonaws.com' "$account" "$region" ;;
  esac
}

lifecycle_policy() {
  printf '{"rules": [{"rulePriority": 1, "description": "Expire untagged images after %s days", "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": %s}, "action": {"type": "expire"}}]}' \
    "$untagged_days" "$untagged_days"
}

# Sets repository_exists (0/1).
ensure_repository() {
  repository_exists=0
  local mutability
  if mutability=$(aws ecr describe-repositories --region "$region" --registry-id "$account" \
    --repository-names "$repository" --query 'repositories[0].imageTagMutability' --output text 2>"$tmp/describe.err"); then
    repository_exists=1
    say "ECR repository $repository exists (tag mutability $mutability); its settings are left as they are"
    [[ $mutability != IMMUTABLE ]] ||
      warn "$repository is IMMUTABLE without exclusions: pushing latest-<variant> fails once that tag exists; allow it with: aws ecr put-image-tag-mutability --repository-name $repository --image-tag-mutability IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters 'filterType=WILDCARD,filter=latest-*' 'filterType=WILDCARD,filter=*-dirty-*'"
    return
  fi
  grep -q RepositoryNotFoundException "$tmp/describe.err" ||
    die "cannot read ECR repository '$repository' in $region: $(tr -s '\n' ' ' <"$tmp/describe.err")"

  say "creating ECR repository $repository in $region"
  local filters=() filter
  for filter in "${MUTABLE_TAG_FILTERS[@]}"; do filters+=("filterType=WILDCARD,filter=$filter"); done
  local create=(aws ecr create-repository --region "$region" --repository-name "$repository"
    --image-scanning-configuration scanOnPush=true --output text --query repository.repositoryUri)
  if ! run "${create[@]}" --image-tag-mutability IMMUTABLE_WITH_EXCLUSION \
    --image-tag-mutability-exclusion-filters "${filters[@]}" >/dev/null 2>"$tmp/create.err"; then
    if grep -qiE 'exclusion|Unknown options|invalid choice' "$tmp/create.err"; then
      warn "this AWS CLI or region does not support IMMUTABLE_WITH_EXCLUSION ($(tr -s '\n' ' ' <"$tmp/create.err")); creating a MUTABLE repository: only this script's check protects version tags"
      run "${create[@]}" --image-tag-mutability MUTABLE >/dev/null ||
        die "creating ECR repository '$repository' failed"
    else
      die "creating ECR repository '$repository' failed: $(tr -s '\n' ' ' <"$tmp/create.err")"
    fi
  fi
  run aws ecr put-lifecycle-policy --region "$region" --repository-name "$repository" \
    --lifecycle-policy-text "$(lifecycle_policy)" --output text --query repositoryName >/dev/null ||
    die "setting the lifecycle policy of '$repository' failed"
}

# Refuse to reuse a version or commit tag unless --force.
check_tags_are_new() {
  ((repository_exists)) || return 0
  local ids=() variant found
  for variant in "${variants[@]}"; do
    ids+=("imageTag=$version-$variant")
    [[ -z $git_tag || $git_tag == *-dirty ]] || ids+=("imageTag=$git_tag-$variant")
  done
  found=$(aws ecr batch-get-image --region "$region" --registry-id "$account" --repository-name "$repository" \
    --image-ids "${ids[@]}" --query 'images[].imageId.imageTag' --output text 2>"$tmp/tags.err") ||
    die "cannot list the tags of ECR repository '$repository': $(tr -s '\n' ' ' <"$tmp/tags.err")"
  [[ -n $found && $found != None ]] || return 0
  if ((force)); then
    warn "tag(s) already in $repository, overwriting because of --force: $found"
  else
    die "tag(s) already in $repository: $found. Bump \`version\` in pyproject.toml (or pass --version) and commit, or pass --force (mutable repositories only)"
  fi
}

# Sets local_image for one variant.
build_variant() {
  local variant=$1 status=0
  local build=(env "PLATFORM=$platform")
  [[ -z ${BASE_IMAGE:-} ]] || build+=("BASE_IMAGE=$BASE_IMAGE")
  [[ -z ${TORCH_INDEX_URL:-} ]] || build+=("TORCH_INDEX_URL=$TORCH_INDEX_URL")
  build+=("$ROOT/container/build-image.sh" "$variant")
  if ((dry_run)); then
    run "${build[@]}"
    local_image="${IMAGE_NAME:-sagemaker-classifier}:$variant-<content-tag>"
    return
  fi
  local_image=$(run "${build[@]}" | tail -n 1) || status=$?
  [[ $status -eq 0 && -n $local_image ]] ||
    die "building the $variant image failed (exit $status); the builder's output is above"
  local actual
  actual=$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$local_image") ||
    die "built $local_image but cannot inspect it"
  [[ $platform == "$actual" || $platform == "$actual"/* ]] ||
    die "$local_image is $actual, not $platform"
  say "built $local_image ($actual)"
}

main() {
  exec 3>&2
  parse_args "$@"
  require_docker
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  read_version
  read_git_sha

  local target
  if [[ -n $registry ]]; then
    target=$registry/$repository
  else
    require_aws
    resolve_region
    resolve_account
    target=$(ecr_host)/$repository
    ensure_repository
    check_tags_are_new
  fi

  local variant tag tags=() refs=()
  for variant in "${variants[@]}"; do
    tags=("$version-$variant")
    [[ -z $git_tag ]] || tags+=("$git_tag-$variant")
    tags+=("latest-$variant")
    build_variant "$variant"
    for tag in "${tags[@]}"; do
      run docker tag "$local_image" "$target:$tag" || die "docker tag $local_image $target:$tag failed"
      refs+=("$target:$tag")
    done
  done

  if ((no_push)); then
    say "--no-push: tagged, not pushed"
  else
    if [[ -z $registry ]]; then
      local host=${target%%/*}
      printf '+ aws ecr get-login-password --region %q | docker login --username AWS --password-stdin %q\n' \
        "$region" "$host" >&3
      if ((!dry_run)); then
        aws ecr get-login-password --region "$region" |
          docker login --username AWS --password-stdin "$host" >&2 ||
          die "logging docker in to $host failed (see above)"
      fi
    fi
    local ref
    for ref in "${refs[@]}"; do
      run docker push "$ref" >&2 ||
        die "docker push $ref failed (see above; 'denied' usually means missing permissions, no login, or an immutable tag)"
    done
    if ((!dry_run)); then
      for ref in "${refs[@]}"; do
        [[ $ref == *:"$version"-* ]] || continue
        say "pushed $ref = $(docker image inspect --format '{{join .RepoDigests " "}}' "$ref" |
          tr ' ' '\n' | grep -F "$target@" | head -n 1 || true)"
      done
    fi
  fi
  printf '%s\n' "${refs[@]}"
}

main "$@"
