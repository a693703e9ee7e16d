"""The GPU check (issue 28): whole sweeps through `lr-sweep run`, in each engine mode, on one GPU.

Against one warm background Prefect server (`lr-sweep server start` once, stopped at the end) and
after a small warm-up sweep (the dataset decoded into its cache, W&B's service started):

- sweeps: `default` (the default sweep: 3 rates, 1 seed, 5 epochs) and `grid27` (9 rates x 3
  seeds, 5 epochs);
- modes: `eager` (one trial at a time, no graph: --pack off --cuda-graphs off), `graphs` (one
  trial at a time as a CUDA graph: --pack off) and `packed` (packs as CUDA graphs: the defaults;
  on a CPU, where `auto` packs nothing, --pack 32);
- the seed's way (benchmarks/seed_way.py: a DataLoader loop, W&B offline run per rate) of the
  default sweep.

Per run: wall time of the command, training seconds (summary.json: a pack's members share one
training time), aggregate training images/s, the GPU's mean utilisation over the trials phase
(nvidia-smi, 1 s samples; null without nvidia-smi), the peak GPU memory and its share per pack
member (nvidia-smi, the CUDA context included), the command's peak RSS; then the ratios between
modes and against the seed's way, and the issue's targets. One-at-a-time eager training of the
27 trials would take 4-5 minutes on an H200, so that run trains GRID27_EAGER_EPOCHS epoch(s) and
its 5-epoch training and wall are extrapolated (marked so).

    python -m benchmarks.gpu_check --data-dir DATA --out DIR            # on a GPU node
    python -m benchmarks.gpu_check --quick --data-dir DATA --out DIR    # CPU smoke: tiny runs
    benchmarks/gpu_check.sh --bundle gpu-bundle.tar.xz                  # from the air-gapped bundle

Figures are printed as a table and written to OUT/gpu-check.json after every run, so a run cut
short by a time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("eager", "graphs", "packed")
GRID27_RATES = ["0.003", "0.002", "0.001", "0.0007", "0.0005", "0.0003", "0.0002", "0.0001", "0.00005"]
GRID27_EAGER_EPOCHS = 1
SWEEPS = ("default", "grid27")
# Tiny runs for a CPU smoke test of the whole path: the 27-trial sweep cut to 3 rates x 3 seeds.
QUICK_FLAGS = ["--train-limit", "256", "--val-size", "256", "--epochs", "1"]
QUICK_GRID_RATES = 3
# The targets on one H200 (docs/performance.md).
TARGETS = {"default_packed_train_s_max": 3.0, "default_packed_wall_s_max": 15.0, "grid27_packed_train_s_max": 10.0,
           "packed_vs_eager_images_per_s_min": 10.0, "gpu_utilisation_pct_min": 50.0, "seed_way_vs_packed_wall_min": 4.0,
           "fixed_s_max": 8.0, "peak_rss_mb_max": 1500.0}
# A run is not started with less time left than this before the deadline.
MIN_RUN_S = 40.0
FLOW_START = "Beginning flow run"
# Where these come from is recorded: a bundle's tree, or the node's own packages.
IMPORTED_FROM = ("torch", "prefect", "wandb", "matplotlib")


@dataclass
class Run:
    sweep: str
    mode: str
    flags: list[str]
    epochs_ratio: float = 1.0  # full epochs / epochs trained: >1 when training and wall are extrapolated
    figures: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.sweep}-{self.mode}"


def mode_flags(mode: str, device: str) -> list[str]:
    if mode == "eager":
        return ["--pack", "off", "--cuda-graphs", "off"]
    if mode == "graphs":
        return ["--pack", "off"]
    return [] if device.startswith("cuda") else ["--pack", "32"]


def sweep_flags(sweep: str, quick: bool) -> list[str]:
    if sweep == "default":
        return []
    rates = GRID27_RATES[:QUICK_GRID_RATES] if quick else GRID27_RATES
    return ["--learning-rates", *rates, "--seeds", "0", "1", "2", "--epochs", "5"]


def plan(device: str, quick: bool) -> list[Run]:
    """The timed runs, most telling first (a deadline cuts the tail)."""
    runs = []
    for sweep in SWEEPS:
        for mode in reversed(MODES):
            flags = sweep_flags(sweep, quick) + mode_flags(mode, device) + ["--device", device]
            ratio = 1.0
            if quick:
                flags += QUICK_FLAGS
            elif sweep == "grid27" and mode == "eager":
                flags += ["--epochs", str(GRID27_EAGER_EPOCHS)]
                ratio = 5 / GRID27_EAGER_EPOCHS
            runs.append(Run(sweep, mode, flags, ratio))
    return runs


# --- the GPU's utilisation ----------------------------------------------------------------------

class GpuSampler:
    """nvidia-smi once a second, each call read whole (a long-running `nvidia-smi -l` writing into
    a file buffers its lines): (unix time, utilisation %, memory used MiB), all GPUs averaged."""

    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.found: list[tuple[float, float, float]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> GpuSampler:
        if shutil.which(self.QUERY[0]):  # no nvidia-smi: utilisation null
            self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            try:
                output = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            sample = parse_sample(time.time(), output)
            if sample:
                self.found.append(sample)

    def stop(self) -> None:
        self.done.set()

    def samples(self) -> list[tuple[float, float, float]]:
        return list(self.found)


def parse_sample(stamp: float, output: str) -> tuple[float, float, float] | None:
    """One nvidia-smi answer, a line per GPU: their mean utilisation and summed memory."""
    rows = []
    for line in output.splitlines():
        try:
            rows.append([float(part) for part in line.split(",")])
        except ValueError:
            continue  # "[N/A]"
    if not rows:
        return None
    return stamp, sum(row[0] for row in rows) / len(rows), sum(row[1] for row in rows)


def window_mean(samples: list[tuple[float, float, float]], start: float, end: float) -> tuple[float | None, int]:
    inside = [utilisation for stamp, utilisation, _ in samples if start <= stamp <= end]
    return (sum(inside) / len(inside), len(inside)) if inside else (None, 0)


def trials_window(log_text: str, timings: dict) -> tuple[float, float] | None:
    """The trials phase in unix time: the flow's start in OUTPUT/SWEEP/prefect.log (local time,
    as nvidia-smi's stamps) plus the phases summary.json times."""
    for line in log_text.splitlines():
        if FLOW_START in line:
            start = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() + timings["prepare_data"]
            return start, start + timings["trials"]
    return None


# --- the figures of one run ---------------------------------------------------------------------

def training_seconds(trials: list[dict]) -> float:
    """A pack's members each report the pack's training time: counted once per pack."""
    packs: dict[str, float] = {}
    alone = 0.0
    for trial in trials:
        seconds = trial.get("train_seconds") or 0.0
        pack = trial.get("pack") or {}
        if pack.get("size", 1) > 1:
            packs[pack["id"]] = max(packs.get(pack["id"], 0.0), seconds)
        else:
            alone += seconds
    return alone + sum(packs.values())


def run_figures(summary: dict, wall_s: float, epochs_ratio: float = 1.0) -> dict:
    """What summary.json and the wall clock say about one `lr-sweep run`."""
    trials = summary["trials"]
    completed = [t for t in trials if t["status"] == "completed"]
    trained = training_seconds(trials)
    images = sum(summary["dataset"]["train_size"] * len(t["history"]) for t in completed)
    engines = sorted({t.get("engine") or "none" for t in trials})
    packs = [(t.get("pack") or {}).get("size", 1) for t in trials]
    figures = {
        "trials": len(trials), "completed": len(completed), "engines": engines, "largest_pack": max(packs, default=1),
        "wall_s": wall_s, "train_s": trained, "trials_phase_s": summary["timings"]["trials"],
        "fixed_s": wall_s - trained, "images": images, "images_per_s": images / trained if trained else None,
        "best_val_accuracy": max((t["evaluation"]["val_accuracy"] for t in completed if t.get("evaluation")), default=None),
    }
    if epochs_ratio != 1.0:  # trained fewer epochs: the full sweep's training and wall, extrapolated
        figures.update(extrapolated=True, epochs_ratio=epochs_ratio, train_s_full=trained * epochs_ratio,
                       wall_s_full=wall_s - trained + trained * epochs_ratio)
    return figures


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def full_wall(figures: dict) -> float | None:
    return figures.get("wall_s_full", figures.get("wall_s"))


def ratios(runs: dict[str, dict], seed_way: dict | None) -> dict:
    """Speed-ups: images/s of one mode over another, and wall times (the full sweep's, where
    extrapolated) of the seed's way and one-at-a-time eager over each mode."""
    found = {}
    for sweep in SWEEPS:
        eager, graphs, packed = (runs.get(f"{sweep}-{mode}", {}) for mode in MODES)
        found[sweep] = {
            "graphs_vs_eager_images_per_s": ratio(graphs.get("images_per_s"), eager.get("images_per_s")),
            "packed_vs_eager_images_per_s": ratio(packed.get("images_per_s"), eager.get("images_per_s")),
            "packed_vs_graphs_images_per_s": ratio(packed.get("images_per_s"), graphs.get("images_per_s")),
            "eager_vs_packed_wall": ratio(full_wall(eager), full_wall(packed)),
            "eager_vs_graphs_wall": ratio(full_wall(eager), full_wall(graphs)),
        }
    if seed_way:
        for mode in MODES:
            found["default"][f"seed_way_vs_{mode}_wall"] = ratio(seed_way["wall_s"], full_wall(runs.get(f"default-{mode}", {})))
    return found


def checks(runs: dict[str, dict], found: dict) -> dict:
    """The issue's targets, each true, false or null (not measured)."""
    default, grid = runs.get("default-packed", {}), runs.get("grid27-packed", {})

    def at_most(value, limit):
        return None if value is None else value <= limit

    def at_least(value, limit):
        return None if value is None else value >= limit

    rss = [f["peak_rss_mb"] for f in runs.values() if f.get("peak_rss_mb") is not None]
    return {
        "default_packed_train_s": at_most(default.get("train_s"), TARGETS["default_packed_train_s_max"]),
        "default_packed_wall_s": at_most(default.get("wall_s"), TARGETS["default_packed_wall_s_max"]),
        "grid27_packed_train_s": at_most(grid.get("train_s"), TARGETS["grid27_packed_train_s_max"]),
        "packed_vs_eager_images_per_s": at_least(found["grid27"]["packed_vs_eager_images_per_s"],
                                                 TARGETS["packed_vs_eager_images_per_s_min"]),
        "gpu_utilisation": at_least(grid.get("gpu_utilisation_pct"), TARGETS["gpu_utilisation_pct_min"]),
        "seed_way_vs_packed_wall": at_least(found["default"].get("seed_way_vs_packed_wall"),
                                            TARGETS["seed_way_vs_packed_wall_min"]),
        "fixed_s": at_most(default.get("fixed_s"), TARGETS["fixed_s_max"]),
        "peak_rss_mb": at_most(max(rss), TARGETS["peak_rss_mb_max"]) if rss else None,
    }


# --- running the commands -----------------------------------------------------------------------

def command_env(prefect_home: Path) -> dict:
    """The project first on the path; the server without its UI (the bundle leaves it out)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "PREFECT_HOME": str(prefect_home), "PREFECT_UI_ENABLED": "false",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "WANDB_SILENT": "true",
                        "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def timed(command: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Runs `command` to its end: wall seconds, exit code and its peak RSS (wait4's, this
    process's children being waited for one at a time)."""
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
    killer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    killer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - started, "exit_code": process.returncode,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run_one(run: Run, args, env: dict, workdir: Path, sampler: GpuSampler, timeout: float) -> dict:
    out = workdir / run.name
    flags = run.flags + ["--data-dir", args.data_dir, "--output-dir", str(out / "runs"),
                         "--registry-dir", str(out / "registry"), "--sweep-id", run.name]
    before = sampler.samples()
    baseline = before[-1][2] if before else None
    result = timed(cli("run", *flags), env, workdir / f"{run.name}.log", timeout)
    summary_file = out / "runs" / run.name / "summary.json"
    if result["exit_code"] != 0 or not summary_file.exists():
        tail = (workdir / f"{run.name}.log").read_text()[-2000:]
        return {"error": f"exit {result['exit_code']}", "log_tail": tail, **result}
    summary = json.loads(summary_file.read_text())
    figures = run_figures(summary, result["wall_s"], run.epochs_ratio) | {"peak_rss_mb": result["peak_rss_mb"], "flags": run.flags}
    samples = sampler.samples()
    log_file = out / "runs" / run.name / "prefect.log"
    window = trials_window(log_file.read_text(), summary["timings"]) if log_file.exists() else None
    figures["gpu_utilisation_pct"], figures["gpu_samples"] = window_mean(samples, *window) if window else (None, 0)
    during = [memory for stamp, _, memory in samples[len(before):]]
    if during:
        figures["gpu_memory_peak_mib"] = max(during)
        # nvidia-smi's memory.used: the CUDA context and allocator's cache are in it.
        figures["gpu_memory_per_member_mib"] = (max(during) - (baseline or 0)) / figures["largest_pack"]
    return figures


def seed_way(args, env: dict, workdir: Path, timeout: float) -> dict:
    flags = ["--data-dir", args.data_dir, "--device", args.device, "--out", str(workdir / "seed-way")]
    if args.quick:
        flags += ["--train-limit", "256", "--epochs", "1"]
    log = workdir / "seed-way.log"
    result = timed([sys.executable, "-m", "benchmarks.seed_way", *flags], env, log, timeout)
    if result["exit_code"] != 0:
        return {"error": f"exit {result['exit_code']}", "log_tail": log.read_text()[-2000:], **result}
    reported = json.loads(log.read_text().strip().splitlines()[-1])
    return result | {"train_loop_s": reported["seconds"], "images": reported["images"],
                     "images_per_s": reported["images"] / reported["seconds"], "num_workers": reported["num_workers"]}


def machine(device: str) -> dict:
    import torch

    from benchmarks.gpu_bundle import unmet_requirements

    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(), "device": device,
            # A bundle built with --node-provides runs on the node's versions of those: say where they differ.
            "unmet_requirements": unmet_requirements(),
            "imported_from": {name: getattr(importlib.util.find_spec(name), "origin", None) for name in IMPORTED_FROM}}
    if device.startswith("cuda") and torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return info


# --- the report ---------------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(report: dict) -> str:
    lines = [f"{'run':<16} {'wall s':>8} {'train s':>8} {'fixed s':>8} {'images/s':>11} {'GPU %':>6} "
             f"{'GPU MiB/member':>14} {'RSS MB':>7}  engines"]
    for name, f in report["runs"].items():
        if "error" in f:
            lines.append(f"{name:<16} {f['error']}")
            continue
        mark = f" (x{f['epochs_ratio']:g} epochs: wall {_fmt(f['wall_s_full'])}, train {_fmt(f['train_s_full'])})" \
            if f.get("extrapolated") else ""
        lines.append(f"{name:<16} {_fmt(f['wall_s']):>8} {_fmt(f['train_s']):>8} {_fmt(f['fixed_s']):>8} "
                     f"{_fmt(f['images_per_s'], 0):>11} {_fmt(f.get('gpu_utilisation_pct'), 0):>6} "
                     f"{_fmt(f.get('gpu_memory_per_member_mib'), 0):>14} {_fmt(f['peak_rss_mb'], 0):>7}  "
                     f"{','.join(f['engines'])}{mark}")
    seed = report.get("seed_way")
    if seed and "error" not in seed:
        lines.append(f"{'seed way':<16} {_fmt(seed['wall_s']):>8} {_fmt(seed['train_loop_s']):>8} {'':>8} "
                     f"{_fmt(seed['images_per_s'], 0):>11} {'':>6} {'':>14} {_fmt(seed['peak_rss_mb'], 0):>7}")
    for sweep, found in report.get("ratios", {}).items():
        lines.append(f"{sweep}: " + ", ".join(f"{k} {_fmt(v, 2)}x" for k, v in found.items()))
    if "checks" in report:
        lines.append("targets: " + ", ".join(f"{k} {'-' if v is None else 'ok' if v else 'MISSED'}"
                                             for k, v in report["checks"].items()))
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    report["ratios"] = ratios(report["runs"], report.get("seed_way"))
    report["checks"] = checks(report["runs"], report["ratios"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="Holds FashionMNIST/raw (or the cache). Default: %(default)s.")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check",
                        help="Folder for gpu-check.json. Default: $OUT, else %(default)s.")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (the default with --quick).")
    parser.add_argument("--quick", action="store_true", help="Tiny runs (256 images, 1 epoch): a smoke test on a CPU.")
    parser.add_argument("--deadline-s", type=float, default=510.0,
                        help="Start no run that could end past this many seconds. Default: %(default)s.")
    parser.add_argument("--workdir", help="Keep the sweeps' outputs here (default: a temporary folder, removed: $OUT "
                        "comes back from a device machine, thousands of files do not belong there).")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.data_dir = str(Path(args.data_dir).resolve())
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA GPU here; run it on a GPU node, or --quick (--device cpu) for a smoke run",
                  file=sys.stderr)
            return 1
    started = time.monotonic()
    out = Path(args.out)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lr-sweep-gpu-check-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = command_env(workdir / "prefect")
    report: dict = {"machine": machine(args.device), "quick": args.quick, "runs": {}, "skipped": []}
    for problem in report["machine"]["unmet_requirements"]:
        print(f"gpu_check: warning: {problem}", flush=True)
    sampler = GpuSampler().start()
    try:
        report["server_start"] = timed(cli("server", "start"), env, workdir / "server.log", 120)
        warm_up = ["--learning-rates", "0.001", "--epochs", "1", "--train-limit", "1000", "--device", args.device,
                   "--data-dir", args.data_dir, "--output-dir", str(workdir / "warm-up"),
                   "--registry-dir", str(workdir / "warm-up-registry"), "--sweep-id", "warm-up"]
        report["warm_up"] = timed(cli("run", *warm_up), env, workdir / "warm-up.log", 180)
        print(f"server started in {report['server_start']['wall_s']:.1f} s, warm-up sweep {report['warm_up']['wall_s']:.1f} s",
              flush=True)
        steps = [(run.name, run) for run in plan(args.device, args.quick)]
        steps.insert(3, ("seed-way", None))  # after the default sweep's modes
        for name, run in steps:
            left = args.deadline_s - (time.monotonic() - started)
            if left < MIN_RUN_S:
                report["skipped"].append(name)
                continue
            if run is None:
                report["seed_way"] = seed_way(args, env, workdir, left)
            else:
                report["runs"][name] = run_one(run, args, env, workdir, sampler, left)
            figures = report.get("seed_way") if run is None else report["runs"][name]
            print(f"{name}: {json.dumps({k: v for k, v in figures.items() if k != 'log_tail'})}", flush=True)
            if "error" in figures:
                print(figures["log_tail"], flush=True)
            write(report, out)
    finally:
        timed(cli("server", "stop"), env, workdir / "server-stop.log", 60)
        sampler.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["total_s"] = time.monotonic() - started
    write(report, out)
    print(table(report), flush=True)
    print(f"figures written to {out / 'gpu-check.json'}", flush=True)
    failed = [name for name, f in report["runs"].items() if "error" in f] + (
        ["seed-way"] if "error" in report.get("seed_way", {}) else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
