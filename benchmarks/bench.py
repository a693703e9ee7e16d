"""`make bench`: how fast the sweep trains, and what the orchestration around it costs.

One run, on the same data (Fashion-MNIST, the sweep's own train/validation split) and the same
network (models/cnn.py, the same seeded initial weights), measures:

1. training images/s of our engine (`tasks.training.train.train_trial`: dataset resident on the device,
   batches sliced from a seeded permutation) against a plain loop written like pytorch/examples
   mnist/main.py (a torchvision Dataset with ToTensor + Normalize, a DataLoader of batch 64,
   `num_workers=0`), one epoch each, the same thread count; and the validation accuracy of both
   after that epoch, so speed is not bought with accuracy;
2. evaluation images/s (`tasks.evaluation.evaluate.measure` over the test set); packs of 3 and 9
   trials (`train_pack`) against the same trials one at a time;
3. a whole sweep through the real Prefect flow (`flows.sweep.lr_sweep`, W&B offline, local
   registry, evaluation, report) under Prefect's temporary server, in a fresh process: its wall
   time against the sum of its trials' `train_seconds` (the orchestration overhead), and the peak
   RSS of that process. The server's start-up is NOT in the wall time: the clock starts when the
   server answers, as it would for a user whose server is already running.

Figures are printed and written to the JSON file named by BENCH_JSON (default bench.json), with
the machine they ran on and the load average around the run (other work on the machine distorts
them; every figure is from one run).

    make bench                                        # CPU, about 5 minutes on 2 cores
    .venv/bin/python -m flows.environment .venv/bin/python -m benchmarks.bench --help
    benchmarks/gpu_check.sh                           # on a GPU node: whole sweeps in each engine mode
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from flows.config import SweepConfig
from models.cnn import architecture, build_model
from tasks.data.builtin import torchvision_class
from tasks.data.dataset import DatasetRef, Splits, split_indices
from tasks.data.prepare import load_splits, prepare_dataset, tensor_batches
from tasks.evaluation.evaluate import eval_batch_size, measure, place_model
from tasks.results import TrialSpec
from tasks.training.devices import configure_cpu_threads, resolve_devices
from tasks.training.packed import train_pack
from tasks.training.train import make_optimizer, train_trial

# The targets, checked and reported (a miss is printed, the exit code stays 0: a
# benchmark on a shared machine informs, it does not gate).
MIN_ENGINE_VS_DATALOADER = 1.5
MAX_FLOW_OVERHEAD = 0.10
MIN_TRIAL_SECONDS = 30.0
# `lr-sweep run` costs its training and little more.
MAX_CLI_FIXED_SECONDS = 8.0
MAX_PEAK_RSS_MB = 1500
# pytorch/examples mnist/main.py reads the loss back every `log_interval` (10) batches.
LOG_INTERVAL = 10
# Repeats of the evaluation timing (it is short); the median is reported.
EVAL_REPEATS = 3


# --- the machine -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def proc_status_mb(field: str, pid: int | str = "self") -> float | None:
    """A memory figure of /proc/PID/status (Linux): VmHWM is the peak RSS, VmRSS the current."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        pass
    return None


def child_processes_peak_rss() -> dict[str, float]:
    """Peak RSS of this process's children (the temporary Prefect server, W&B's service), read
    while they still run: getrusage's RUSAGE_CHILDREN would report the parent's size at fork."""
    peaks: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if status.get("PPid", "").strip() == str(os.getpid()) and "VmHWM" in status:
            name = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            label = "prefect-server" if "prefect.server" in name else status["Name"].strip()
            peaks[label] = max(peaks.get(label, 0.0), int(status["VmHWM"].split()[0]) / 1024)
    return peaks


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --- 1. our engine against a DataLoader loop -----------------------------------------------------

def one_epoch_spec(config: SweepConfig) -> TrialSpec:
    """The sweep's first trial, for one epoch."""
    return TrialSpec.shared(config).but(learning_rate=config.learning_rates[0], epochs=1)


def warm_up(spec: TrialSpec, splits: Splits, device: str) -> None:
    """A few hundred images through the engine, so that one-time costs (oneDNN primitives, CUDA
    context and cuDNN heuristics) land in neither of the timed epochs."""
    small = Splits(splits.dataset, splits.train_x[:2048], splits.train_y[:2048], splits.val_x[:1000],
                   splits.val_y[:1000], splits.test_x[:1000], splits.test_y[:1000])
    train_trial(spec, small, device)


def engine_epoch(spec: TrialSpec, splits: Splits, device: str) -> dict:
    result = train_trial(spec, splits, device)
    return {"images_per_s": result.samples_per_second, "val_accuracy": result.history[-1]["val_accuracy"],
            "state_dict": result.state_dict}


def dataloader_epoch(spec: TrialSpec, ref: DatasetRef, splits: Splits, device: str,
                     engine_model: bool = False) -> dict:
    """One epoch as pytorch/examples mnist/main.py trains: Dataset + transform + DataLoader.

    The same images (the sweep's split), the same normalisation constants, the same initial
    weights (same seed), the same optimizer and learning rate; only the data path and the loop
    differ. The network runs as the example's does (default layout and optimizer implementation)
    or, with `engine_model`, as the engine runs it (`place_model`, fused optimizer): the gap
    between that loop and the engine is what the resident data path alone is worth.
    """
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ref.mean, ref.std)])
    dataset = torchvision_class(ref.name)(ref.root, train=True, download=False, transform=transform)
    train_idx, _ = split_indices(len(dataset), ref.val_size, ref.split_seed, ref.train_limit)
    loader = DataLoader(Subset(dataset, train_idx.tolist()), batch_size=spec.training.batch_size, shuffle=True,
                        num_workers=0, pin_memory=device.startswith("cuda"),
                        generator=torch.Generator().manual_seed(spec.seed))
    torch.manual_seed(spec.seed)
    model = build_model(architecture(spec.network.hidden_units))
    model = place_model(model, device) if engine_model else model.to(device)
    # fused=None: PyTorch's default optimizer implementation, as the example gets.
    optimizer = make_optimizer(spec.training.optimizer, model.parameters(), spec.learning_rate,
                               fused=True if engine_model else None)
    model.train()
    synchronize(device)
    started = time.perf_counter()
    images = 0
    for batch_idx, (data, target) in enumerate(loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = nn.functional.cross_entropy(output, target)
        loss.backward()
        optimizer.step()
        images += len(data)
        if batch_idx % LOG_INTERVAL == 0:
            loss.item()  # the example prints it here
    synchronize(device)
    seconds = time.perf_counter() - started
    # Validation accuracy through the same function as the engine's, on the same tensors.
    _, val_accuracy = measure(model, tensor_batches(splits.val_x, splits.val_y, eval_batch_size(splits.device)))
    return {"images_per_s": images / seconds, "val_accuracy": val_accuracy}


# --- 2. evaluation ---------------------------------------------------------------------------------

def evaluation_speed(spec: TrialSpec, state_dict: dict, splits: Splits, device: str) -> float:
    model = place_model(build_model(architecture(spec.network.hidden_units)), device)
    model.load_state_dict(state_dict)
    measure(model, tensor_batches(splits.test_x[:1000], splits.test_y[:1000], eval_batch_size(splits.device)))  # warm-up
    times = []
    for _ in range(EVAL_REPEATS):
        synchronize(device)
        started = time.perf_counter()
        measure(model, tensor_batches(splits.test_x, splits.test_y, eval_batch_size(splits.device)))  # reads the result back: synchronised
        times.append(time.perf_counter() - started)
    return len(splits.test_x) / statistics.median(times)


# --- 2b. a pack against its trials one after the other ---------------------------------------------

def sliced(splits: Splits, images: int) -> Splits:
    return Splits(splits.dataset, splits.train_x[:images], splits.train_y[:images], splits.val_x[:1000],
                  splits.val_y[:1000], splits.test_x[:1000], splits.test_y[:1000])


def pack_speed(spec: TrialSpec, splits: Splits, device: str, sizes: list[int], images: int) -> dict:
    """N trials (rates halving from the first, seed 0, one epoch on `images` training images and
    1,000 validation images): one packed engine call (tasks.training.packed.train_pack, a CUDA graph
    on a GPU) against the same trials one after the other (train_trial), wall time of each."""
    small = sliced(splits, images)
    graphs = device.startswith("cuda")
    train_pack([spec, spec.but(seed=1)], sliced(splits, 256), device, graphs=graphs, say=lambda _: None)  # warm-up
    figures = {}
    for size in sizes:
        specs = [spec.but(learning_rate=spec.learning_rate * 0.5 ** i) for i in range(size)]
        synchronize(device)
        started = time.perf_counter()
        for member in specs:
            train_trial(member, small, device)
        synchronize(device)
        one_by_one = time.perf_counter() - started
        started = time.perf_counter()
        run = train_pack(specs, small, device, graphs=graphs, say=lambda _: None)
        synchronize(device)
        packed = time.perf_counter() - started
        figures[str(size)] = {"one_at_a_time_images_per_s": size * images / one_by_one, "engine": run.engine,
                              "packed_images_per_s": size * images / packed, "packed_vs_one_at_a_time": one_by_one / packed}
    return figures


# --- 3. the whole sweep through Prefect, in a fresh process ----------------------------------------

def sweep_overrides(args, config: SweepConfig, engine_images_per_s: float, workdir: Path) -> dict:
    """The sweep to time: the default one (GPU check), or 3 trials sized to last about
    `--trial-seconds` of training each on this machine (a slice of the training set)."""
    overrides = {"device": args.device, "data_dir": str(config.data_dir), "trials_per_device": args.trials_per_device,
                 "output_dir": str(workdir / "runs"), "registry_dir": str(workdir / "registry")}
    if args.default_sweep:
        return overrides
    available = 60000 - (config.val_size or 10000)  # val_size none: one sixth of the 60k
    # More epochs when the whole training split is too short for `--trial-seconds` (fast machines).
    epochs = max(args.sweep_epochs, math.ceil(args.trial_seconds * engine_images_per_s / available))
    limit = math.ceil(args.trial_seconds * engine_images_per_s / epochs / 1000) * 1000
    return overrides | {"epochs": epochs, "train_limit": max(1000, min(available, limit))}


def run_sweep_child(overrides: dict, workdir: Path) -> dict:
    result_file = workdir / "sweep.json"
    # A Prefect home of its own: the timed sweep leaves nothing in the user's.
    env = os.environ | {"PREFECT_HOME": str(workdir / "prefect")}
    subprocess.run([sys.executable, "-m", "benchmarks.bench", "--sweep-child", json.dumps(overrides),
                    "--result-file", str(result_file)], check=True, env=env)
    return json.loads(result_file.read_text())


def cli_flags(overrides: dict) -> list[str]:
    flags = []
    for name, value in overrides.items():
        flags += [f"--{name.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return flags


def cli_fixed_cost(overrides: dict, workdir: Path) -> dict:
    """What `lr-sweep run` costs beyond its trials' training, as a user runs it: the real command
    in a fresh process, a warm PREFECT_HOME (its background server already started by an earlier
    run), the dataset prepared. Its parts come from the flow's own timings in summary.json."""
    lr_sweep = str(Path(sys.executable).parent / "lr-sweep")
    env = os.environ | {"PREFECT_HOME": str(workdir / "cli-prefect")}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    # As `lr-sweep` loads them: the collector paused, everything frozen before the process ends.
    subprocess.run([sys.executable, "-c", "import gc, flows.cli\nwith flows.cli.collector_paused('flows.sweep'): "
                    "import flows.sweep\ngc.freeze()"], check=True, env=env)
    imports = time.perf_counter() - started
    try:
        started = time.perf_counter()  # the first run: starts the server (and W&B's service) cold
        subprocess.run([lr_sweep, "run", *cli_flags(overrides | {"epochs": 1, "train_limit": 1000,
                                                                 "learning_rates": [0.001], "sweep_id": "bench-warm-up"})],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first_run = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([lr_sweep, "run", *cli_flags(overrides | {"sweep_id": "bench-cli"})], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
    finally:
        subprocess.run([lr_sweep, "server", "stop"], env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((Path(overrides["output_dir"]) / "bench-cli" / "summary.json").read_text())
    trained = sum(t["train_seconds"] for t in summary["trials"])
    phases = summary["timings"]
    outside = wall - imports - summary["wall_seconds"]
    parts = {  # disjoint: they add up to cli_fixed_seconds
        "imports_s": imports,
        "server_s": 0.0,  # reused: started by the first run
        "prepare_data_s": phases["prepare_data"],
        "trials_beyond_training_s": phases["trials"] - trained,
        "evaluations_s": phases["evaluate"],
        "compare_and_promote_s": phases["compare_and_promote"],
        "report_files_s": phases["report_files"],  # the charts and report.md
        # The rest, outside the phases summary.json can time: flow-run creation, the report's
        # Prefect artifacts and events, the flow's end, process exit.
        "flow_start_end_and_exit_s": outside - phases["report_files"],
    }
    of_which = {  # inside trials_beyond_training_s
        "trial_setup_s": sum(t["setup_seconds"] or 0 for t in summary["trials"]),  # data to device, W&B start
        "wandb_start_s": sum(t["wandb_start_seconds"] or 0 for t in summary["trials"]),
    }
    return {"cli_wall_s": wall, "cli_train_seconds_sum": trained, "cli_fixed_seconds": wall - trained,
            "cli_fixed_parts": parts, "cli_fixed_parts_of_trials": of_which, "cli_first_run_wall_s": first_run,
            # ru_maxrss of the children waited for: the lr-sweep processes (not the server, which
            # runs on in a session of its own)
            "cli_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def sweep_child(overrides: dict, result_file: Path) -> None:
    """Runs in its own process: Prefect's temporary server, then the flow, timed without the
    server's start-up; peak RSS of this process (the flow and its tasks; the server and W&B's
    service run in processes of their own, their largest peak is reported beside it)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import lr_sweep

    config = SweepConfig(**overrides)
    rss_after_imports = proc_status_mb("VmRSS")
    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        server_start = time.perf_counter() - started
        started = time.perf_counter()
        summary = lr_sweep(config)
        wall = time.perf_counter() - started
        helpers = child_processes_peak_rss()
    trials = summary["trials"]
    train_seconds = [t["train_seconds"] for t in trials if t["train_seconds"] is not None]
    epochs = config.epochs
    images = sum(summary["dataset"]["train_size"] * epochs for t in trials if t["status"] == "completed")
    result = {
        "config": {k: overrides.get(k, getattr(config, k)) for k in
                   ("learning_rates", "epochs", "train_limit", "val_size", "batch_size", "device", "trials_per_device")},
        "train_size": summary["dataset"]["train_size"],
        "server_start_s": server_start,
        "wall_s": wall,
        "trial_train_seconds": train_seconds,
        "trial_images_per_s": [t["samples_per_second"] for t in trials],
        "trial_status": [t["status"] for t in trials],
        "val_accuracy": [t["history"][-1]["val_accuracy"] if t["history"] else None for t in trials],
        "training_images": images,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": rss_after_imports,
        "helper_peak_rss_mb": helpers,
    }
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        result["gpu_peak_memory_mb"] = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    result_file.write_text(json.dumps(result))


# --- main ------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto. Default: cpu.")
    parser.add_argument("--data-dir", default=str(SweepConfig.model_fields["data_dir"].default),
                        help="Dataset cache directory (as the sweep's --data-dir). Default: %(default)s.")
    parser.add_argument("--json", default=os.environ.get("BENCH_JSON", "bench.json"),
                        help="Where the figures go. Default: $BENCH_JSON or bench.json.")
    parser.add_argument("--trial-seconds", type=float, default=35.0,
                        help="Training seconds each of the 3 timed trials should last; the training "
                        "slice is sized from the engine's measured speed. Default: %(default)s.")
    parser.add_argument("--sweep-epochs", type=int, default=3, help="Epochs of the timed sweep. Default: %(default)s.")
    parser.add_argument("--default-sweep", action="store_true",
                        help="Time the default sweep (all data, default epochs) instead of a sized slice.")
    parser.add_argument("--trials-per-device", type=int, default=1,
                        help="Concurrent trials per GPU in the timed sweep (CPU: always 1). Default: 1.")
    parser.add_argument("--pack-sizes", type=int, nargs="*", default=[3, 9],
                        help="Packs to time against their trials one at a time (none: skip). Default: 3 9.")
    parser.add_argument("--pack-images", type=int, default=2048,
                        help="Training images of each trial in the pack timing. Default: %(default)s.")
    parser.add_argument("--keep", action="store_true", help="Keep the timed sweep's output directory.")
    parser.add_argument("--sweep-child", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep_child:
        sweep_child(json.loads(args.sweep_child), Path(args.result_file))
        return 0

    config = SweepConfig(device=args.device, data_dir=Path(args.data_dir))
    devices = resolve_devices(config.device)
    configure_cpu_threads(devices)
    device = devices[0]
    figures: dict = {"machine": machine(device), "runs_per_figure": 1}
    print(f"machine: {json.dumps(figures['machine'])}", flush=True)

    ref = prepare_dataset(config.dataset, config.data_dir, config.val_size, config.split_seed, None)
    splits = load_splits(ref, device)
    spec = one_epoch_spec(config)
    print(f"one epoch of {ref.train_size:,} {ref.name} images, batch {spec.training.batch_size}, {spec.training.optimizer} "
          f"lr {spec.learning_rate:g}, seed {spec.seed}, on {device} ...", flush=True)
    warm_up(spec, splits, device)
    engine = engine_epoch(spec, splits, device)
    print(f"  engine:     {engine['images_per_s']:9,.0f} images/s, val accuracy {engine['val_accuracy']:.4f}", flush=True)
    baseline = dataloader_epoch(spec, ref, splits, device)
    print(f"  DataLoader: {baseline['images_per_s']:9,.0f} images/s, val accuracy {baseline['val_accuracy']:.4f}", flush=True)
    tuned = dataloader_epoch(spec, ref, splits, device, engine_model=True)
    print(f"  DataLoader, engine's model set-up: {tuned['images_per_s']:9,.0f} images/s, val accuracy "
          f"{tuned['val_accuracy']:.4f}", flush=True)
    eval_speed = evaluation_speed(spec, engine["state_dict"], splits, device)
    print(f"  evaluation: {eval_speed:9,.0f} images/s (test set, median of {EVAL_REPEATS})", flush=True)
    packs = pack_speed(spec, splits, device, args.pack_sizes, args.pack_images) if args.pack_sizes else {}
    for size, pack in packs.items():
        print(f"  pack of {size} ({pack['engine']}): {pack['packed_images_per_s']:9,.0f} images/s against "
              f"{pack['one_at_a_time_images_per_s']:,.0f} one at a time ({pack['packed_vs_one_at_a_time']:.2f}x)", flush=True)
    figures.update(
        packs=packs, pack_images=args.pack_images,
        engine_images_per_s=engine["images_per_s"], dataloader_images_per_s=baseline["images_per_s"],
        engine_vs_dataloader=engine["images_per_s"] / baseline["images_per_s"],
        engine_val_accuracy=engine["val_accuracy"], dataloader_val_accuracy=baseline["val_accuracy"],
        dataloader_engine_model_images_per_s=tuned["images_per_s"],
        dataloader_engine_model_val_accuracy=tuned["val_accuracy"],
        engine_vs_dataloader_engine_model=engine["images_per_s"] / tuned["images_per_s"],
        accuracy_epochs=1, eval_images_per_s=eval_speed,
    )

    workdir = Path(tempfile.mkdtemp(prefix="lr-sweep-bench-"))
    try:
        overrides = sweep_overrides(args, config, engine["images_per_s"], workdir)
        print(f"timed sweep through the Prefect flow: {json.dumps(overrides)} (temporary server start-up "
              "excluded) ...", flush=True)
        sweep = run_sweep_child(overrides, workdir)
        print("the real `lr-sweep run` of the same sweep, warm PREFECT_HOME (background server running) ...",
              flush=True)
        # Its own registry and outputs: the flow's sweep above stored these trials, which the CLI
        # would otherwise reuse instead of training.
        figures.update(cli_fixed_cost(overrides | {"output_dir": str(workdir / "cli-runs"),
                                                   "registry_dir": str(workdir / "cli-registry")}, workdir))
    finally:
        if args.keep:
            print(f"sweep output kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    train_total = sum(sweep["trial_train_seconds"])
    figures.update(
        flow_overhead=(sweep["wall_s"] - train_total) / train_total,
        sweep_wall_s=sweep["wall_s"], sweep_train_seconds_sum=train_total,
        sweep_aggregate_images_per_s=sweep["training_images"] / sweep["wall_s"],
        sweep_concurrency=train_total / sweep["wall_s"],
        peak_rss_mb=sweep["peak_rss_mb"], sweep=sweep,
    )
    figures["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    checks = {"engine_vs_dataloader_at_least_1.5": figures["engine_vs_dataloader"] >= MIN_ENGINE_VS_DATALOADER}
    # The overhead target is for trials one after another, each training for 30 s or more.
    if sweep["config"]["trials_per_device"] == 1 or device == "cpu":
        checks["flow_overhead_at_most_0.10"] = figures["flow_overhead"] <= MAX_FLOW_OVERHEAD
    if not args.default_sweep:
        checks["trials_at_least_30_s"] = min(sweep["trial_train_seconds"]) >= MIN_TRIAL_SECONDS
    checks["all_trials_completed"] = all(s == "completed" for s in sweep["trial_status"])
    checks["cli_fixed_seconds_at_most_8"] = figures["cli_fixed_seconds"] <= MAX_CLI_FIXED_SECONDS
    checks["flow_overhead_at_most_0.05"] = figures["flow_overhead"] <= 0.05
    checks["peak_rss_at_most_1500_mb"] = max(figures["peak_rss_mb"], figures["cli_peak_rss_mb"]) <= MAX_PEAK_RSS_MB
    figures["checks"] = checks
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print_summary(figures, args.json)
    return 0


def print_summary(f: dict, path: str) -> None:
    s = f["sweep"]
    m = f["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads" + (
        f", {m['gpu']}" if "gpu" in m else "") + f", torch {m['torch']}, device {m['device']}"
    lines = [
        "",
        f"== lr-sweep benchmark on {where} (load {m['load_average_at_start']} -> {m['load_average_at_end']}) ==",
        f"training, one epoch, batch 64:  engine {f['engine_images_per_s']:,.0f} images/s | "
        f"DataLoader loop {f['dataloader_images_per_s']:,.0f} images/s | ratio {f['engine_vs_dataloader']:.2f}x",
        f"  the DataLoader loop with the engine's model set-up (channels_last, in-place ReLU, fused "
        f"optimizer): {f['dataloader_engine_model_images_per_s']:,.0f} images/s, so the resident data path "
        f"alone is worth {f['engine_vs_dataloader_engine_model']:.2f}x",
        f"val accuracy after 1 epoch:     engine {f['engine_val_accuracy']:.4f} | DataLoader loop "
        f"{f['dataloader_val_accuracy']:.4f} | DataLoader, engine's set-up {f['dataloader_engine_model_val_accuracy']:.4f} "
        "(same seed, same split, same initial weights)",
        f"evaluation:                     {f['eval_images_per_s']:,.0f} images/s",
        *([f"packs, {f['pack_images']:,} images each, one epoch: " + " | ".join(
            f"{size} trials {p['packed_images_per_s']:,.0f} against {p['one_at_a_time_images_per_s']:,.0f} images/s one at a "
            f"time ({p['packed_vs_one_at_a_time']:.2f}x)" for size, p in f["packs"].items())] if f["packs"] else []),
        f"sweep through Prefect:          {len(s['trial_train_seconds'])} trials x {s['config']['epochs']} epochs x "
        f"{s['train_size']:,} images, {s['config']['trials_per_device']} at a time per device",
        f"  wall {f['sweep_wall_s']:.1f} s (server start-up {s['server_start_s']:.1f} s excluded) | trials' training "
        f"{f['sweep_train_seconds_sum']:.1f} s ({', '.join(f'{t:.1f}' for t in s['trial_train_seconds'])})",
        f"  flow overhead {f['flow_overhead']:+.1%} | aggregate {f['sweep_aggregate_images_per_s']:,.0f} images/s | "
        f"peak RSS {f['peak_rss_mb']:,.0f} MB ({s['rss_after_imports_mb'] or 0:,.0f} MB of it after imports; "
        f"own processes: {', '.join(f'{k} {v:,.0f} MB' for k, v in s['helper_peak_rss_mb'].items()) or 'none'})"
        + (f" | GPU peak {s['gpu_peak_memory_mb']:,.0f} MB" if "gpu_peak_memory_mb" in s else ""),
        *(["  (trials ran concurrently: the training seconds overlap, so the overhead can be negative; "
           f"summed training / wall = {f['sweep_concurrency']:.2f}x)"] if s["config"]["trials_per_device"] > 1 else []),
        f"lr-sweep run (warm PREFECT_HOME):  wall {f['cli_wall_s']:.1f} s - training {f['cli_train_seconds_sum']:.1f} s "
        f"= fixed {f['cli_fixed_seconds']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in f['cli_fixed_parts'].items())}; "
        f"the trials' part holds {', '.join(f'{k} {v:.1f}' for k, v in f['cli_fixed_parts_of_trials'].items())}); "
        f"first run (cold server) {f['cli_first_run_wall_s']:.1f} s; peak RSS {f['cli_peak_rss_mb']:,.0f} MB",
        "checks: " + ", ".join(f"{name} {'ok' if ok else 'MISSED'}" for name, ok in f["checks"].items()),
        f"figures written to {path}",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
