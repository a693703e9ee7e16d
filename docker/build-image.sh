#!/usr/bin/env bash
# The lr-sweep image where pytorch/pytorch cannot be pulled: the CPU base of docker/base-image.sh
# (reused when its recipe is unchanged), then the project's Dockerfile on it, as it is.
#
#   docker/build-image.sh TAG [--extra-ca FILE] [--pip-conf FILE] [--mount DIR]... [--no-cache]
#
# --extra-ca FILE (or BUILD_EXTRA_CA): PEM certificates pip trusts besides its own bundle, for both
# images (the Dockerfile gets them as --build-arg EXTRA_CA_CERTS). --pip-conf and --mount (or
# BUILD_PIP_CONF, BUILD_PIP_MOUNTS) are the base image's: see docker/base-image.sh. --no-cache
# rebuilds the Dockerfile's layers (not the base). Prints the image's timings on stderr.
#
# Builds with Docker's classic builder (DOCKER_BUILDKIT=0), the one prefect-docker's
# build_docker_image step uses too: BuildKit would first fetch the docker/dockerfile:1 frontend
# the Dockerfile's `# syntax` line names, from Docker Hub. Export DOCKER_BUILDKIT=1 where Docker Hub
# is reachable. The build's RUN steps use the host's network (--network host): a Docker engine
# started with --bridge=none has no other.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
DOCKER=${DOCKER:-docker}

[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
tag=$1
shift
extra_ca=${BUILD_EXTRA_CA:-}
base_args=()
build_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --extra-ca) extra_ca=$2; shift 2 ;;
        --pip-conf|--mount) base_args+=("$1" "$2"); shift 2 ;;
        --no-cache) build_args+=(--no-cache); shift ;;
        *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -n "$extra_ca" ]; then
    base_args+=(--extra-ca "$extra_ca")
    build_args+=(--build-arg "EXTRA_CA_CERTS=$(cat "$extra_ca")")
fi

started=$SECONDS
base=$("$HERE/base-image.sh" "${base_args[@]}" | tail -n 1)
base_seconds=$((SECONDS - started))

started=$SECONDS
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} "$DOCKER" build --network host --build-arg "BASE_IMAGE=$base" \
    "${build_args[@]}" --tag "$tag" "$ROOT" >&2
image_seconds=$((SECONDS - started))
echo "build-image: $tag on $base: base ${base_seconds} s, Dockerfile ${image_seconds} s," \
     "$("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')" >&2
echo "$tag"
