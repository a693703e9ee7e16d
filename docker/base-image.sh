#!/usr/bin/env bash
# A CPU base image for the Dockerfile, built from Debian packages and the package index only, for
# machines that cannot pull pytorch/pytorch (no registry, an air-gapped or proxied network):
#
#   Debian bookworm (debootstrap --variant=minbase) with python3 (3.11), python3-venv, pip and
#   ca-certificates; a virtual environment in /opt/venv, first on PATH, holding pyproject.toml's
#   torch and torchvision pins and their dependencies, at the versions docker/base-constraints.txt
#   fixes (regenerate it with `docker run --rm IMAGE pip freeze --all | grep -v ^pip==`).
#
#   docker/base-image.sh [--extra-ca FILE] [--pip-conf FILE] [--mount DIR]...
#   docker/base-image.sh --print-image      # the image reference of this recipe; builds nothing
#
# Prints the image reference (lr-sweep-base:<hash>) as its last line on stdout; the rest goes to
# stderr. The tag is the SHA-256 of this script, the two pins and the constraints (the recipe): when an image with
# that tag exists it is reused at once, so only a change of the recipe builds a new base. Then:
#
#   docker build --network host --build-arg BASE_IMAGE=lr-sweep-base:<hash> -t lr-sweep .
#
# (docker/build-image.sh does both.) The torch wheel is the CUDA build from the package index
# (with its nvidia-* libraries, about 5.5 GB installed): the image runs on CPU, and on a GPU too.
#
# Options, each also taken from the environment (the flag wins):
#   --extra-ca FILE   BUILD_EXTRA_CA     PEM certificates pip trusts besides its own bundle, e.g.
#                                        the CA of a TLS-inspecting proxy. Used during the build,
#                                        not left in the image.
#   --pip-conf FILE   BUILD_PIP_CONF     a pip configuration (index-url, extra-index-url,
#                                        find-links, ...) for the install; not left in the image.
#                                        Put no password in a URL you would not want in a log.
#   --mount DIR       BUILD_PIP_MOUNTS   (space-separated) a local directory the pip configuration
#                                        names (a wheel directory, a file:// index), bind-mounted
#                                        read-only at the same path while pip runs, never copied.
#   DEBIAN_MIRROR (default http://deb.debian.org/debian), BASE_IMAGE_REPO (default lr-sweep-base).
#
# Needs root (debootstrap, chroot, bind mounts), debootstrap and a running Docker engine.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REPO=${BASE_IMAGE_REPO:-lr-sweep-base}
DOCKER=${DOCKER:-docker}

extra_ca=${BUILD_EXTRA_CA:-}
pip_conf=${BUILD_PIP_CONF:-}
read -r -a mounts <<<"${BUILD_PIP_MOUNTS:-}"
print_only=
while [ $# -gt 0 ]; do
    case $1 in
        --print-image) print_only=1; shift ;;
        --extra-ca) extra_ca=$2; shift 2 ;;
        --pip-conf) pip_conf=$2; shift 2 ;;
        --mount) mounts+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "base-image.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done
for file in "$extra_ca" "$pip_conf"; do
    [ -z "$file" ] || [ -r "$file" ] || { echo "base-image.sh: cannot read $file" >&2; exit 2; }
done
for dir in "${mounts[@]}"; do
    case $dir in /*) ;; *) echo "base-image.sh: --mount $dir: give an absolute path" >&2; exit 2 ;; esac
    [ -d "$dir" ] || { echo "base-image.sh: --mount $dir: no such directory" >&2; exit 2; }
done

log() { echo "base-image: $*" >&2; }

# The recipe: this script and the pins it installs. Where the packages come from (mirror, pip
# configuration, CA) is not part of it: the same recipe gives the same image content.
pins=$(grep -oE '"torch(vision)?==[^"]+"' "$ROOT/pyproject.toml" | tr -d '"' | sort)
[ "$(wc -l <<<"$pins")" -eq 2 ] || { echo "base-image.sh: no torch/torchvision pins in pyproject.toml" >&2; exit 1; }
constraints="$HERE/base-constraints.txt"
recipe_hash=$( { cat "${BASH_SOURCE[0]}" "$constraints"; echo "$SUITE $PACKAGES"; echo "$pins"; } | sha256sum | cut -c1-16)
image="$REPO:$recipe_hash"
[ -z "$print_only" ] || { echo "$image"; exit 0; }

exists() { "$DOCKER" image inspect "$image" >/dev/null 2>&1; }
if exists; then
    log "reusing $image (same recipe)"
    echo "$image"
    exit 0
fi

# One build per recipe at a time; a second caller waits and then reuses the first one's image.
lock="/var/tmp/lr-sweep-base-$recipe_hash.lock"
exec 9>"$lock"
flock 9
if exists; then
    log "reusing $image (built meanwhile)"
    echo "$image"
    exit 0
fi

work=$(mktemp -d /var/tmp/lr-sweep-base.XXXXXX)
rootfs="$work/rootfs"
mounted=()
cleanup() {
    local status=$? index
    for ((index = ${#mounted[@]} - 1; index >= 0; index--)); do
        umount "${mounted[index]}" 2>/dev/null || umount -l "${mounted[index]}" || true
    done
    # Never delete through a mount that is still there (a bind mount of a wheel directory).
    if grep -qF " $work/" /proc/mounts; then
        log "mounts under $work are still there; not removing it"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

started=$SECONDS
log "building $image: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
log "debootstrap done in $((SECONDS - started)) s"

# pip in the chroot: the host's network and DNS, the given configuration, CA and directories.
mount -t proc proc "$rootfs/proc" && mounted+=("$rootfs/proc")
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
build_dir="$rootfs/run/lr-sweep-build"
mkdir -p "$build_dir"
cp "$constraints" "$build_dir/constraints.txt"
pip_env=(PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_ROOT_USER_ACTION=ignore)
if [ -n "$pip_conf" ]; then
    cp "$pip_conf" "$build_dir/pip.conf"
    pip_env+=(PIP_CONFIG_FILE=/run/lr-sweep-build/pip.conf)
else
    pip_env+=(PIP_CONFIG_FILE=/dev/null)  # nothing from the host's configuration leaks in
fi
created=()
for dir in "${mounts[@]}"; do
    target="$rootfs$dir"
    if [ ! -d "$target" ]; then
        # The topmost directory mkdir -p creates, to be removed again after the install.
        top=$dir
        while [ "$(dirname "$top")" != / ] && [ ! -d "$rootfs$(dirname "$top")" ]; do top=$(dirname "$top"); done
        mkdir -p "$target"
        created+=("$rootfs$top")
    fi
    mount --bind -o ro "$dir" "$target" && mounted+=("$target")
done

in_root() { chroot "$rootfs" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_root python3 -m venv /opt/venv
if [ -n "$extra_ca" ]; then
    # pip's own bundle plus the extra certificates: pip trusts both while it runs.
    in_root python3 -c 'import pip._vendor.certifi as c; print(open(c.where()).read())' >"$build_dir/ca.pem"
    cat "$extra_ca" >>"$build_dir/ca.pem"
    pip_env+=(PIP_CERT=/run/lr-sweep-build/ca.pem)
fi
started=$SECONDS
# shellcheck disable=SC2086
in_root "${pip_env[@]}" python3 -m pip install --constraint /run/lr-sweep-build/constraints.txt $pins
log "pip install $(tr '\n' ' ' <<<"$pins")done in $((SECONDS - started)) s"
in_root python3 -c 'import torch, torchvision; print("base-image: torch", torch.__version__, "torchvision", torchvision.__version__)' >&2

for ((index = ${#mounted[@]} - 1; index >= 0; index--)); do umount "${mounted[index]}"; done
mounted=()
for dir in "${created[@]}"; do find "$dir" -depth -type d -empty -delete; done
# Nothing of the build stays: its configuration, the host's resolver, caches, apt lists, docs.
rm -rf "$build_dir" "$rootfs"/root/.cache "$rootfs"/tmp/* "$rootfs"/var/tmp/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/*
: >"$rootfs/etc/resolv.conf"  # Docker provides both at run time
: >"$rootfs/etc/hostname"

started=$SECONDS
tar --numeric-owner --xattrs -C "$rootfs" -cf - . | "$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV VIRTUAL_ENV=/opt/venv' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.opencontainers.image.description=\"lr-sweep CPU base: Debian $SUITE, Python 3 venv in /opt/venv, $(tr '\n' ' ' <<<"$pins")\"" \
    --change "LABEL lr-sweep.base-recipe=$recipe_hash" \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
log "docker import done in $((SECONDS - started)) s: $image, $("$DOCKER" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"
echo "$image"
