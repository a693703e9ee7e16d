"""What a user sees, in a real browser: a smoke sweep on a real Prefect server (the background
server `lr-sweep run` starts), then Debian's chromium driven by Playwright opens the report
artifact (its six chart images loaded), the flow run (progress artifacts at 100, W&B links)
and the deployment's run form (the learning-rate field first). Screenshots are saved under the
test's temporary folder (printed)."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows import local_server

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPO_ROOT = Path(__file__).resolve().parent.parent


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{url}/api{path}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_prefect_ui_shows_the_sweep(fashion_data_dir, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: apt-get install chromium (.ci/run does)")
    home = tmp_path / "prefect"
    # As a user runs it: INFO logs too (the test session quiets Prefect to WARNING).
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL")}
    env |= {"PREFECT_HOME": str(home)}
    try:
        sweep = subprocess.run(
            [str(BIN / "lr-sweep"), "run", "--learning-rates", "0.001", "0.0001", "--epochs", "2",
             "--train-limit", "2000", "--val-size", "2000", "--device", "cpu", "--sweep-id", "ui-check",
             "--data-dir", str(fashion_data_dir), "--output-dir", str(tmp_path / "runs"),
             "--registry-dir", str(tmp_path / "registry")],
            env=env, capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        url = local_server.recorded(home).url
        deploy_env = env | {"PREFECT_API_URL": f"{url}/api"}
        for command in (["work-pool", "create", "lr-sweep-process", "--type", "process", "--overwrite"],
                        ["--no-prompt", "deploy", "--name", "lr-sweep/local"]):
            done = subprocess.run([str(BIN / "prefect"), *command], env=deploy_env, cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

        [run] = api(url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
        artifacts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        by_key = {a["key"]: a for a in artifacts}
        assert by_key["lr-sweep-report"]["task_run_id"] is None  # attached to the flow run itself
        progress = [a for a in artifacts if a["type"] == "progress"]
        assert len(progress) == 2 and all(float(a["data"]) == 100.0 for a in progress)
        assert {k for k in by_key if k.startswith("wandb-")} == {"wandb-lr0-001-seed0", "wandb-lr0-0001-seed0"}
        [deployment] = [d for d in api(url, "/deployments/filter") if d["name"] == "local"]

        with playwright.sync_playwright() as browser_driver:
            browser = browser_driver.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.goto(f"{url}/artifacts/artifact/{by_key['lr-sweep-report']['id']}")
            page.wait_for_function("document.querySelectorAll('img').length >= 5", timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('img')].every(i => i.complete)", timeout=60_000)
            widths = page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")
            assert len(widths) == 6 and all(width > 0 for width in widths), widths
            assert page.get_by_text("Smoke run").count() >= 1
            page.screenshot(path=str(tmp_path / "report-artifact.png"), full_page=True)

            page.goto(f"{url}/runs/flow-run/{run['id']}")
            page.get_by_text("Beginning flow run").first.wait_for(timeout=60_000)  # its logs are shown
            assert page.get_by_text("report:").count() >= 1
            page.screenshot(path=str(tmp_path / "flow-run.png"))

            page.goto(f"{url}/deployments/deployment/{deployment['id']}/run")
            page.get_by_text("1 Experiment · learning rates").first.wait_for(timeout=60_000)
            labels = page.locator("text=/^\\d \\w+ · /").all_inner_texts()
            assert labels and labels[0].startswith("1 Experiment · learning rates"), labels[:3]
            for field in ("model", "model arguments", "learning-rate schedule", "warmup epochs", "precision"):
                assert any(label.startswith(f"1 Experiment · {field}") for label in labels), (field, labels)
            page.screenshot(path=str(tmp_path / "run-form.png"))
            browser.close()
        print(f"\nscreenshots: {tmp_path}/report-artifact.png, flow-run.png, run-form.png")
    finally:
        local_server.stop_recorded(home)
