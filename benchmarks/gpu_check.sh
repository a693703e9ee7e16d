#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (under 5 minutes on one GPU):
# the default sweep (all of Fashion-MNIST, 5 epochs, 3 learning rates) through the Prefect flow on
# the GPU with TRIALS_PER_DEVICE trials at a time on each GPU, after our engine against the
# DataLoader loop on the same GPU. Prints the aggregate training images/s of the sweep, its wall
# time, the same ratios as `make bench`, and the GPU's mean utilisation while it ran.
#
#   benchmarks/gpu_check.sh                      # from anywhere; uses .venv/bin/python
#   PYTHON=python3 TRIALS_PER_DEVICE=4 BENCH_JSON=/tmp/gpu.json benchmarks/gpu_check.sh
#
# Needs the project installed (`make install`) and Fashion-MNIST in DATA_DIR (default data/),
# in /usr/share/datasets/fashion-mnist, or reachable for torchvision's download.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TRIALS_PER_DEVICE=${TRIALS_PER_DEVICE:-3}
DATA_DIR=${DATA_DIR:-data}
export BENCH_JSON=${BENCH_JSON:-bench-gpu.json}
export PREFECT_HOME=${PREFECT_HOME:-$(mktemp -d)}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 WANDB_SILENT=true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA GPU here; run it on a GPU node (make bench is the CPU check)" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Sample the GPU's utilisation once a second while the benchmark runs.
samples=$(mktemp)
sampler=""
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 >"$samples" 2>/dev/null &
    sampler=$!
fi
stop_sampler() { if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; fi; }
trap 'stop_sampler; rm -f "$samples"' EXIT

status=0
timeout 290 "$PYTHON" -m flows.environment "$PYTHON" -m benchmarks.bench --device cuda --default-sweep \
    --trials-per-device "$TRIALS_PER_DEVICE" --data-dir "$DATA_DIR" --json "$BENCH_JSON" || status=$?
stop_sampler

if [ -s "$samples" ]; then
    awk '{ sum += $1; n += 1; if ($1 > max) max = $1 }
         END { if (n) printf "GPU utilisation over the run: mean %.0f%%, max %.0f%% (%d one-second samples, all GPUs)\n", sum / n, max, n }' "$samples"
fi
if [ "$status" -ne 0 ]; then
    echo "gpu_check: the benchmark failed or ran past 290 s (exit $status)" >&2
    exit "$status"
fi
"$PYTHON" - "$BENCH_JSON" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
s = f["sweep"]
print(f"GPU sweep: {len(s['trial_train_seconds'])} trials, {s['config']['trials_per_device']} per GPU: "
      f"{f['sweep_aggregate_images_per_s']:,.0f} images/s aggregate, wall {f['sweep_wall_s']:.1f} s, "
      f"trials' training {f['sweep_train_seconds_sum']:.1f} s (concurrency {f['sweep_concurrency']:.2f}x), "
      f"flow overhead {f['flow_overhead']:+.1%}; engine/DataLoader {f['engine_vs_dataloader']:.2f}x")
EOF
