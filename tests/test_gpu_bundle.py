"""The GPU check's pieces (benchmarks/gpu_bundle.py, gpu_check.py, gpu_check.sh) and, slow, the
bundle built for this Python and run on a CPU by an interpreter that sees torch and nothing else."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import venv
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest

from benchmarks import gpu_bundle, gpu_check

ROOT = Path(__file__).resolve().parent.parent


# --- the pinned list ------------------------------------------------------------------------------

def names(pins: list[str]) -> set[str]:
    return {pin.split("==")[0] for pin in pins}


def test_the_pinned_list_leaves_out_torch_and_what_the_node_brings_with_it():
    pins = gpu_bundle.pinned_list("3.12")
    found = names(pins)
    assert {"prefect", "wandb", "pydantic", "pydantic-settings", "safetensors", "matplotlib"} <= found
    # torch, torchvision, and what they require: the node has those
    assert not found & {"torch", "torchvision", "numpy", "pillow", "sympy", "jinja2", "filelock", "typing-extensions"}
    assert not [name for name in found if name.startswith(("nvidia-", "cuda-", "triton"))]
    assert not found & gpu_bundle.OMIT
    assert "scipy" not in found  # the t-test is plain Python (tasks/evaluation/student_t.py)
    assert "greenlet" in found  # Prefect asks for sqlalchemy[asyncio]: an extra's requirements count
    # pinned to what this environment runs
    from importlib import metadata
    assert f"prefect=={metadata.version('prefect')}" in pins
    assert all("==" in pin for pin in pins)


def test_what_the_node_provides_leaves_with_everything_it_requires():
    found = names(gpu_bundle.pinned_list("3.12", ["matplotlib", "not-installed-here"]))
    assert not found & {"matplotlib", "fonttools", "kiwisolver", "contourpy", "cycler"}
    assert {"prefect", "wandb"} <= found


def test_markers_are_read_for_the_node_s_python():
    environment = gpu_bundle.target_environment("3.9")
    assert environment["python_version"] == "3.9" and environment["sys_platform"] == "linux"


def test_a_python_version_that_is_not_major_minor_is_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_bundle.parse_args(["--python-version", "3.12.1"])
    assert stopped.value.code == 2
    assert "--python-version must be MAJOR.MINOR" in capsys.readouterr().err


# --- stripping and the tarball's layout -----------------------------------------------------------

def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_strip_removes_what_no_import_reads_and_keeps_modules(tmp_path):
    site = tmp_path / "site"
    kept = [touch(site / "pkg" / "module.py"), touch(site / "pkg" / "testing" / "helpers.py"),
            touch(site / "pkg-1.0.dist-info" / "METADATA"), touch(site / "wandb" / "bin" / "wandb-core")]
    gone = [touch(site / "pkg" / "tests" / "test_a.py"), touch(site / "pkg" / "__pycache__" / "m.cpython-312.pyc"),
            touch(site / "pkg" / "module.pyi"), touch(site / "prefect" / "server" / "ui" / "index.html"),
            touch(site / "wandb" / "bin" / "librust_parquet_ffi.so"), touch(site / "bin" / "prefect")]
    removed = gpu_bundle.strip(site)
    assert all(path.exists() for path in kept)
    assert not any(path.exists() for path in gone)
    assert removed["paths"] > 0 and removed["dirs"] > 0 and removed["suffixes"] > 0


def test_the_tarball_holds_project_site_data_and_manifest_under_one_folder(tmp_path):
    source = tmp_path / "debian"
    source.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(source / f"{name}.gz", "wb") as out:
            out.write(name.encode())
    staging = tmp_path / "work" / gpu_bundle.TOP
    touch(staging / "project" / "flows" / "cli.py")
    touch(staging / "site" / "prefect" / "__init__.py")
    touch(staging / "bundle.json", "{}")
    gpu_bundle.add_dataset(staging, source)
    output = tmp_path / "dist" / "bundle.tar.xz"
    gpu_bundle.write_tarball(staging, output, preset=0)
    with tarfile.open(output) as tar:
        order = tar.getmembers()
        members = set(tar.getnames())
        raw = f"{gpu_bundle.TOP}/{gpu_bundle.DATASET_RAW}"
        assert tar.extractfile(f"{raw}/train-images-idx3-ubyte").read() == b"train-images-idx3-ubyte"  # decompressed
    assert {f"{gpu_bundle.TOP}/project/flows/cli.py", f"{gpu_bundle.TOP}/site/prefect/__init__.py",
            f"{gpu_bundle.TOP}/bundle.json", f"{raw}/t10k-labels-idx1-ubyte"} <= members
    assert not output.with_name("bundle.tar.xz.partial").exists()
    kinds = [member.isdir() for member in order]
    assert kinds == sorted(kinds, reverse=True)  # every folder before the first file


def test_the_project_part_is_the_tracked_files():
    files = gpu_bundle.tracked_files()
    assert {"benchmarks/gpu_check.sh", "benchmarks/gpu_check.py", "flows/cli.py", "pyproject.toml"} <= set(files)
    assert not [name for name in files if name.startswith((".venv/", "dist/", "data/"))]


# --- gpu_check.py's arithmetic on summary.json ----------------------------------------------------

def trial(rate: float, seed: int, seconds: float, pack: dict | None, epochs: int = 5, status: str = "completed") -> dict:
    return {"learning_rate": rate, "seed": seed, "status": status, "train_seconds": seconds, "pack": pack,
            "engine": "packed+graph" if pack and pack["size"] > 1 else "graph", "history": [{}] * epochs,
            "evaluation": {"val_accuracy": 0.9 - rate}}


def summary(trials: list[dict]) -> dict:
    return {"trials": trials, "dataset": {"train_size": 1000}, "timings": {"prepare_data": 0.5, "trials": 9.0}}


def test_a_pack_s_training_time_counts_once():
    trials = [trial(0.1, 0, 2.0, {"id": "p0", "size": 3}), trial(0.2, 0, 2.0, {"id": "p0", "size": 3}),
              trial(0.3, 0, 1.9, {"id": "p0", "size": 3}), trial(0.4, 0, 1.0, {"id": "t3", "size": 1}),
              trial(0.5, 0, 1.5, None)]
    assert gpu_check.training_seconds(trials) == pytest.approx(2.0 + 1.0 + 1.5)
    figures = gpu_check.run_figures(summary(trials), wall_s=10.0)
    assert figures["images"] == 5 * 5 * 1000
    assert figures["images_per_s"] == pytest.approx(25000 / 4.5)
    assert figures["fixed_s"] == pytest.approx(10.0 - 4.5)
    assert figures["largest_pack"] == 3 and figures["engines"] == ["graph", "packed+graph"]
    assert "extrapolated" not in figures


def test_failed_trials_train_no_images_and_fewer_epochs_extrapolate():
    trials = [trial(0.1, 0, 4.0, None, epochs=1), trial(0.2, 0, 0.5, None, epochs=1, status="failed")]
    figures = gpu_check.run_figures(summary(trials), wall_s=12.0, epochs_ratio=5.0)
    assert figures["images"] == 1000 and figures["completed"] == 1
    assert figures["train_s_full"] == pytest.approx(4.5 * 5)
    assert figures["wall_s_full"] == pytest.approx(12.0 - 4.5 + 22.5)


def fake_runs() -> dict:
    runs = {}
    for sweep, base in (("default", 3), ("grid27", 27)):
        runs[f"{sweep}-eager"] = {"images_per_s": 25000.0, "wall_s": 40.0, "train_s": 30.0, "fixed_s": 10.0, "peak_rss_mb": 1400}
        runs[f"{sweep}-graphs"] = {"images_per_s": 120000.0, "wall_s": 15.0, "train_s": 6.0, "fixed_s": 9.0, "peak_rss_mb": 1450}
        runs[f"{sweep}-packed"] = {"images_per_s": 25000.0 * base, "wall_s": 12.0, "train_s": 2.5, "fixed_s": 7.5,
                                   "peak_rss_mb": 1490, "gpu_utilisation_pct": 70.0}
    runs["grid27-eager"] |= {"wall_s_full": 200.0}
    return runs


def test_ratios_between_modes_and_against_the_seed_s_way():
    found = gpu_check.ratios(fake_runs(), {"wall_s": 60.0})
    assert found["grid27"]["packed_vs_eager_images_per_s"] == pytest.approx(27.0)
    assert found["default"]["graphs_vs_eager_images_per_s"] == pytest.approx(120000 / 25000)
    assert found["grid27"]["eager_vs_packed_wall"] == pytest.approx(200.0 / 12.0)  # the extrapolated wall
    assert found["default"]["seed_way_vs_packed_wall"] == pytest.approx(5.0)
    checks = gpu_check.checks(fake_runs(), found)
    assert checks["packed_vs_eager_images_per_s"] and checks["seed_way_vs_packed_wall"] and checks["gpu_utilisation"]
    assert checks["fixed_s"] and checks["peak_rss_mb"] and checks["default_packed_train_s"]


def test_a_target_not_measured_is_null_not_missed():
    runs = {"default-packed": {"images_per_s": 1.0, "wall_s": 20.0, "train_s": 5.0, "fixed_s": 15.0, "peak_rss_mb": None}}
    checks = gpu_check.checks(runs, gpu_check.ratios(runs, None))
    assert checks["default_packed_wall_s"] is False and checks["fixed_s"] is False
    assert checks["gpu_utilisation"] is None and checks["seed_way_vs_packed_wall"] is None and checks["peak_rss_mb"] is None


def test_gpu_utilisation_is_the_mean_over_the_trials_phase():
    assert gpu_check.parse_sample(7.0, "50, 600\n70, 800\n") == (7.0, 60.0, 1400.0)  # two GPUs
    assert gpu_check.parse_sample(7.0, "[N/A], [N/A]\n") is None
    start = datetime(2026, 12, 5, 10, 0, 0).timestamp()
    samples = [(start + offset, utilisation, 900.0) for offset, utilisation in ((0, 5), (1, 80), (2, 90), (4, 10))]
    log = "2026-12-05 10:00:00,500 INFO    prefect.flow_runs: Beginning flow run 'lr-sweep x' for flow 'lr-sweep'\n"
    window = gpu_check.trials_window(log, {"prepare_data": 0.4, "trials": 2.0})
    assert window[1] - window[0] == pytest.approx(2.0)
    assert gpu_check.window_mean(samples, *window) == (pytest.approx(85.0), 2)
    assert gpu_check.window_mean(samples, 0, 1) == (None, 0)
    assert gpu_check.trials_window("no flow here", {"prepare_data": 0, "trials": 1}) is None


def test_the_sampler_reads_nvidia_smi_once_a_tick(monkeypatch, tmp_path):
    fake = touch(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\necho '42, 1000'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    sampler = gpu_check.GpuSampler(interval=0.05).start()
    try:
        for _ in range(100):
            if len(sampler.samples()) >= 2:
                break
            time.sleep(0.05)
    finally:
        sampler.stop()
    assert [sample[1:] for sample in sampler.samples()[:2]] == [(42.0, 1000.0), (42.0, 1000.0)]


def test_without_nvidia_smi_the_sampler_samples_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sampler = gpu_check.GpuSampler(interval=0.01).start()
    sampler.stop()
    assert sampler.samples() == []


def test_the_plan_runs_every_mode_of_both_sweeps_and_cuts_only_the_eager_27():
    runs = {run.name: run for run in gpu_check.plan("cuda", quick=False)}
    assert set(runs) == {f"{sweep}-{mode}" for sweep in gpu_check.SWEEPS for mode in gpu_check.MODES}
    assert runs["default-eager"].flags[:4] == ["--pack", "off", "--cuda-graphs", "off"]
    assert "--pack" not in runs["default-packed"].flags
    grid = runs["grid27-packed"].flags
    assert len(grid[grid.index("--learning-rates") + 1:grid.index("--seeds")]) == 9
    assert runs["grid27-eager"].epochs_ratio == 5 and runs["grid27-eager"].flags[-2:] == ["--epochs", "1"]
    assert all(run.epochs_ratio == 1 for name, run in runs.items() if name != "grid27-eager")
    quick = {run.name: run for run in gpu_check.plan("cpu", quick=True)}
    assert quick["default-packed"].flags[:2] == ["--pack", "32"]  # auto packs nothing on a CPU
    assert all(run.epochs_ratio == 1 and run.flags[-6:] == gpu_check.QUICK_FLAGS for run in quick.values())


def test_gpu_check_without_a_gpu_says_so(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--device", "cuda", "--out", "unused"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


# --- slow: the bundle for this Python, run with only torch and torchvision beside it --------------

def index_reachable() -> bool:
    url = urlparse(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def torch_only_interpreter(where: Path, node_provides: list[str]) -> Path:
    """A venv without this one's site-packages: only torch, torchvision, `node_provides` and what
    they require, linked in, as a GPU node with nothing else installed has them."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    site = next(where.glob("lib/python*/site-packages"))
    provided = gpu_bundle.closure([*gpu_bundle.NODE_PROVIDES, *node_provides], gpu_bundle.target_environment(
        f"{sys.version_info.major}.{sys.version_info.minor}"))
    from importlib import metadata
    tops = set()
    for name in provided:
        dist = metadata.distribution(name)
        tops |= {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}
    source = Path(metadata.distribution("torch").locate_file(""))
    for top in tops:
        if (source / top).exists() and not (site / top).exists():
            (site / top).symlink_to(source / top)
    return where / "bin" / "python"


@pytest.mark.slow
@pytest.mark.parametrize("node_provides", [[], ["matplotlib"]], ids=["full", "node-has-matplotlib"])
def test_the_bundle_runs_the_check_on_a_cpu_with_only_torch_installed(tmp_path, node_provides):
    if not index_reachable():
        pytest.skip("pip cannot reach the package index")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = tmp_path / "bundle.tar.xz"
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_bundle", "--python-version", version, "--xz-preset", "0",
                    "--output", str(bundle), *(["--node-provides", *node_provides] if node_provides else [])],
                   cwd=ROOT, check=True)
    python = torch_only_interpreter(tmp_path / "node", node_provides)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PREFECT_", "VIRTUAL_ENV"))}
    env |= {"PYTHON": str(python), "PYTHONNOUSERSITE": "1", "PATH": "/usr/bin:/bin"}
    isolated = subprocess.run([str(python), "-c", "import prefect"], env=env, capture_output=True, text=True)
    assert "No module named 'prefect'" in isolated.stderr  # the interpreter alone has no Prefect
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bundle", str(bundle), "--out", str(out),
                             "--quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert set(report["runs"]) == {f"{sweep}-{mode}" for sweep in gpu_check.SWEEPS for mode in gpu_check.MODES}
    assert not [name for name, f in report["runs"].items() if "error" in f]
    assert report["runs"]["grid27-packed"]["largest_pack"] == 9 and report["runs"]["default-eager"]["largest_pack"] == 1
    assert report["seed_way"]["images"] > 0 and report["skipped"] == []
    imported_from = report["machine"]["imported_from"]
    assert "/lr-sweep-gpu/site/" in imported_from["prefect"]
    assert ("/lr-sweep-gpu/site/" in imported_from["matplotlib"]) is not bool(node_provides)
    assert report["machine"]["unmet_requirements"] == []
    shutil.rmtree(tmp_path / "node")
