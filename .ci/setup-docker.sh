#!/usr/bin/env bash
# Install (when missing) and start what the test suite needs on a Debian bookworm machine:
# the Docker engine, BuildKit (buildx), Compose v2, debootstrap, a local OCI registry, and
# Chromium with its WebDriver for the demo page's browser test.
# Compose v2 and buildx come from Debian trixie, pinned low so nothing else is upgraded.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

compose_major=$(docker compose version --short 2>/dev/null | sed 's/^v//; s/\..*//' || true)
if [[ ${compose_major:-0} -lt 2 ]] || ! docker buildx version >/dev/null 2>&1; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [[ -n $mirror ]] || { echo "setup-docker: no Debian mirror (URIs:) in /etc/apt/sources.list.d/debian.sources" >&2; exit 1; }
  cat > /etc/apt/sources.list.d/trixie.sources <<SOURCES
Types: deb
URIs: ${mirror}
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > /etc/apt/preferences.d/trixie-low
  apt-get update -qq
  apt-get install -y -qq -t trixie docker-compose docker-buildx >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "setup-docker: dockerd did not start" >&2; tail -20 /var/log/dockerd.log >&2; exit 1; }
fi
echo "setup-docker: $(docker version --format 'engine {{.Server.Version}}'), compose $(docker compose version --short), buildx $(docker buildx version | awk '{print $2}')" >&2
