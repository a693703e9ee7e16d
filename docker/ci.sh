#!/usr/bin/env bash
# CI stage of the Docker worker (README, "Docker worker without a GPU"): `make test-docker` with
# what it needs around it, on a Debian machine, as root.
#
#   docker/ci.sh [MAKE ARGUMENTS...]      e.g. docker/ci.sh BIN=/path/to/venv/bin -o .venv/.installed
#
# 1. installs docker.io, debootstrap, postgresql and dataset-fashion-mnist when missing (apt-get);
# 2. starts dockerd with host networking only (--bridge=none --iptables=false --ip-masq=false: no
#    Docker network, no NAT; every container of the test uses the host's network), unless a Docker
#    engine already answers, which is then used as it is and left running;
# 3. starts a PostgreSQL cluster of its own (initdb as the postgres user, in a fresh directory, on
#    127.0.0.1 and a free port, password authentication) with a `prefect` role and database;
# 4. gives docker/build-image.sh this machine's way to pip: the CA certificates of
#    /usr/local/share/ca-certificates (a TLS-inspecting proxy's), the user's pip configuration
#    (~/.config/pip/pip.conf: local wheels and indexes) and the directories it names, read-only;
# 5. runs `make test-docker`, then stops PostgreSQL and dockerd by their PIDs, pass or fail, and
#    removes base images of older recipes (docker/base-image.sh keeps the current one for reruns).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
say() { echo "docker/ci.sh: $*" >&2; }

# --- 1. packages -------------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

work=$(mktemp -d /var/tmp/lr-sweep-ci.XXXXXX)
chmod 755 "$work"
dockerd_pid=
postgres_pid=
stop() {
    local status=$?
    if [ -n "$postgres_pid" ] && kill -0 "$postgres_pid" 2>/dev/null; then
        kill -INT "$postgres_pid"  # fast shutdown
        for _ in $(seq 60); do kill -0 "$postgres_pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$postgres_pid" 2>/dev/null && kill -KILL "$postgres_pid"
        say "PostgreSQL (PID $postgres_pid) stopped"
    fi
    if docker info >/dev/null 2>&1; then
        current=$(docker/base-image.sh --print-image 2>/dev/null || true)
        for image in $(docker images --format '{{.Repository}}:{{.Tag}}' lr-sweep-base); do
            if [ -n "$current" ] && [ "$image" != "$current" ] && docker rmi "$image" >/dev/null; then
                say "removed $image (an older recipe)"
            fi
        done
    fi
    if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
        kill -TERM "$dockerd_pid"
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$dockerd_pid" 2>/dev/null && kill -KILL "$dockerd_pid"
        say "dockerd (PID $dockerd_pid) stopped"
    fi
    grep -qF " $work/" /proc/mounts || rm -rf "$work"
    say "done in $((SECONDS - started)) s, exit status $status"
    exit "$status"
}
trap stop EXIT
trap 'exit 130' INT TERM

# --- 2. the Docker engine ----------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    say "using the Docker engine that is already running (left running)"
else
    # host-gateway (prefect-docker maps host.docker.internal to it) is the loopback: there is no bridge.
    dockerd --bridge=none --iptables=false --ip-masq=false --host-gateway-ip=127.0.0.1 \
        --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; say "dockerd did not start"; exit 1; }
    say "dockerd started (PID $dockerd_pid, $(docker info -f '{{.Driver}}, cgroup v{{.CgroupVersion}}'))"
fi

# --- 3. PostgreSQL -----------------------------------------------------------------------------------
mkdir -p "$work/pg/data" "$work/pg/socket" "$work/pg/log"
chown -R postgres:postgres "$work/pg"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg/data" -U postgres --auth-local=peer \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$work/pg/log/initdb.log"
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $work/pg/socket" start >/dev/null
postgres_pid=$(head -n 1 "$work/pg/data/postmaster.pid")
runuser -u postgres -- psql -h "$work/pg/socket" -p "$port" -U postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE ROLE prefect LOGIN PASSWORD '$password'" -c "CREATE DATABASE prefect OWNER prefect"
export DOCKER_E2E_DATABASE_URL="postgresql+asyncpg://prefect:$password@127.0.0.1:$port/prefect"
say "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') started (PID $postgres_pid, 127.0.0.1:$port)"

# --- 4. this machine's way to pip --------------------------------------------------------------------
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cat /usr/local/share/ca-certificates/*.crt >"$work/extra-ca.pem"
    export BUILD_EXTRA_CA="$work/extra-ca.pem"
fi
if [ -f "$HOME/.config/pip/pip.conf" ]; then
    export BUILD_PIP_CONF="$HOME/.config/pip/pip.conf"
    # The local directories it names: a find-links directory, or the folder of a file:// index
    # (its pages link to ../../files).
    BUILD_PIP_MOUNTS=$(grep -oE '(file://)?/[^ ]+' "$BUILD_PIP_CONF" | sed -E 's#^file://##; s#/simple/?$##' \
        | while read -r dir; do [ -d "$dir" ] && echo "$dir"; done | sort -u | tr '\n' ' ')
    export BUILD_PIP_MOUNTS
fi
say "pip for the image build: extra CA ${BUILD_EXTRA_CA:-none}, pip.conf ${BUILD_PIP_CONF:-none}, mounts ${BUILD_PIP_MOUNTS:-none}"

# --- 5. the test -------------------------------------------------------------------------------------
export DOCKER_E2E_REPORT="$work/report.txt"
status=0
make test-docker "$@" || status=$?
if [ -s "$DOCKER_E2E_REPORT" ]; then
    say "report:"
    cat "$DOCKER_E2E_REPORT" >&2
fi
exit "$status"
