#!/usr/bin/env bash
# The GPU check (issue 28), under 5 minutes on one H200: the default sweep and a 27-trial sweep
# through `lr-sweep run`, each one trial at a time eager, as CUDA graphs and packed, and the seed's
# DataLoader loop; a table on stdout, the figures in OUT/gpu-check.json (benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh                                  # from this checkout (.venv, data/)
#   benchmarks/gpu_check.sh --bundle gpu-bundle.tar.xz      # on a node with only Python, torch and torchvision
#   benchmarks/gpu_check.sh --bundle B --out DIR --quick     # a CPU smoke run (tiny sweeps)
#
# --bundle unpacks `make gpu-bundle`'s tarball into a temporary folder and runs from it: its
# dependency tree and the project on PYTHONPATH, its Fashion-MNIST as the data directory. Other
# options go to gpu_check.py (--quick, --device, --deadline-s, --workdir). --out defaults to $OUT.
# PYTHON picks the interpreter (default: python3 with --bundle, else .venv/bin/python).
set -euo pipefail

bundle=""
out="${OUT:-}"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done

if [ -n "$bundle" ]; then
    case "$bundle" in /*) ;; *) bundle="$PWD/$bundle" ;; esac
    PYTHON=${PYTHON:-python3}
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    started=$(date +%s)
    "$PYTHON" - "$bundle" "$work" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    # The data filter where this Python has it: nothing outside the folder, no device files.
    tar.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
EOF
    root="$work/lr-sweep-gpu"
    echo "gpu_check: bundle unpacked in $(( $(date +%s) - started )) s ($(du -sm "$root" | cut -f1) MB)"
    export PYTHONPATH="$root/site:$root/project${PYTHONPATH:+:$PYTHONPATH}"
    data="$root/data"
    cd "$root/project"
else
    cd "$(dirname "$0")/.."
    PYTHON=${PYTHON:-.venv/bin/python}
    data=${DATA_DIR:-data}
fi

status=0
"$PYTHON" -m benchmarks.gpu_check --data-dir "$data" ${out:+--out "$out"} ${extra[@]+"${extra[@]}"} || status=$?
exit "$status"
