#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image for machines that cannot
# pull from a registry (air-gapped builds, CI).  The result stands in for
# python:3.11-slim-bookworm:   docker build --build-arg BASE_IMAGE=<printed name> ...
#
# The image trusts the host's CA bundle so pip and apt work through an
# intercepting proxy; no credentials or proxy settings are written into it.
#
# Usage: container/build-base.sh [IMAGE_NAME]      (prints the image reference)
# Env:   DEBIAN_MIRROR  mirror URI (default: the host's first apt source)
#        CA_BUNDLE      CA bundle to trust (default: /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail

name=${1:-sagemaker-classifier-base}
suite=bookworm
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
packages=python3,python3-venv,python3-pip,ca-certificates

mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror && -f /etc/apt/sources.list.d/debian.sources ]]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "build-base: '$tool' is required" >&2; exit 1; }
done
[[ -r $ca_bundle ]] || { echo "build-base: CA bundle '$ca_bundle' is not readable" >&2; exit 1; }

# Tag by content: the recipe (this script) and the trusted CAs decide the image.
tag=$(cat "$0" "$ca_bundle" | sha256sum | cut -c1-12)
image="$name:$suite-$tag"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >&2
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$image" >&2
echo "$image"
