#!/usr/bin/env bash
# A Debian bookworm base image made from Debian packages (debootstrap + docker import),
# for machines that reach no image registry. The compose Dockerfile takes it through
# BASE_IMAGE; users elsewhere keep the official python:3.11-slim-bookworm.
#
#   bash tools/docker_base.sh [TAG]      # default duet-base:bookworm; no-op if it exists
set -euo pipefail
TAG=${1:-duet-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
fi
root=$(mktemp -d /var/tmp/duet-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
t0=$(date +%s)
# python3 with venv and headers, a compiler for the CPU kernels, CA roots
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-dev,ca-certificates,g++,procps \
    bookworm "$root" "$MIRROR" >/dev/null
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "$TAG built in $(( $(date +%s) - t0 ))s"
