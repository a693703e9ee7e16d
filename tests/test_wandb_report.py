"""The sweep's W&B report: built by the real wandb-workspaces classes from a real sweep (the session's
smoke sweep) and saved to a fake W&B (autospec'd `wandb.Api` and `ServiceApi`), whose upserts are
read back: the spec W&B would store, checked against what the sweep's runs really recorded."""

import json

import pytest
import wandb_workspaces.reports.v2 as wr
from prefect import flow
from wandb_workspaces.reports.v2 import internal

from tasks.reporting import tracking
from tasks.reporting.charts import CURVES
from tasks.reporting.report import wandb_lines
from tasks.reporting.wandb_report import REPORT_FILE, build_wandb_report, save_wandb_report, save_wandb_report_task


def panel_grid(spec: dict) -> dict:
    [grid] = [block for block in spec["blocks"] if block["type"] == "panel-grid"]
    return grid["metadata"]


def markdown(spec: dict) -> str:
    return "\n".join(block["content"] for block in spec["blocks"] if block["type"] == "markdown-block")


def test_the_report_plots_the_runs_the_sweep_recorded_by_learning_rate(smoke_sweep, report_server, tmp_path):
    config, summary = smoke_sweep
    url = save_wandb_report(summary, tmp_path, "proj", None)  # no entity: the API's default one
    [upsert] = report_server.upserts
    assert (upsert["entityName"], upsert["projectName"], upsert["type"]) == ("ent", "proj", "runs")
    assert url == (f"https://wandb.example/ent/proj/reports/{upsert['displayName'].replace(' ', '-')}"
                   f"--{upsert['id']}")
    grid = panel_grid(upsert["spec"])
    [runset] = grid["runSets"]
    assert runset["project"] == {"name": "proj", "entityName": "ent", "id": "internal-1"}
    filters = {f["key"]["name"]: f["value"] for f in runset["filters"]["filters"]}
    assert runset["grouping"] == [{"section": "config", "name": "learning_rate.value"}]
    plots = grid["panelBankSectionConfig"]["panels"]
    assert [plot["config"]["metrics"] for plot in plots] == [[key] for key, _ in CURVES]
    for plot in plots:
        assert plot["viewType"] == "Run History Line Plot"
        assert {k: plot["config"][k] for k in ("xAxis", "groupBy", "groupAgg", "groupArea")} == {
            "xAxis": "epoch", "groupBy": "learning_rate.value", "groupAgg": "mean", "groupArea": "stddev"}
    assert len({(p["layout"]["x"], p["layout"]["y"]) for p in plots}) == len(CURVES)  # two by two, none on another

    # What the filter, the grouping and the charts name is what each trial's run recorded.
    for trial in summary["trials"]:
        records = tracking.run_records(trial["wandb_run_dir"])
        [run] = [r["run"] for r in records if r["type"] == "run"]
        assert (run["run_group"], run["job_type"]) == (filters["group"], filters["jobType"])
        assert run["config"]["update"]["learning_rate"] == trial["learning_rate"]
        logged = {key for r in records if r["type"] == "history" for key in r["history"]["item"]}
        assert {"epoch", *(key for key, _ in CURVES)} <= logged

    text = markdown(upsert["spec"])
    assert not summary["smoke"] and "Smoke run" not in text and "smoke" not in upsert["displayName"]
    winner = summary["aggregates"][0]["learning_rate"]
    assert f"**Learning rate {winner:g} won**" in text
    for trial in summary["trials"]:
        assert f"| {trial['learning_rate']:g} | {trial['seed']} | {trial['status']} |" in text
        assert trial["model"] in text
    assert "- promoted: yes" in text and summary["promotion"]["model"] in text


def test_a_smoke_runs_report_says_so_in_its_title_and_first_line(smoke_sweep):
    config, summary = smoke_sweep
    report = build_wandb_report(summary | {"smoke": True}, "proj", "ent")
    assert report.title.endswith("(smoke run)")
    assert report.blocks[0].text.startswith("> **Smoke run**")


def test_saving_the_report_again_updates_the_same_report(smoke_sweep, report_server, tmp_path):
    config, summary = smoke_sweep
    first = save_wandb_report(summary, tmp_path, "proj", "ent")
    assert save_wandb_report(summary, tmp_path, "proj", "ent") == first
    assert [u["id"] for u in report_server.upserts] == [report_server.upserts[0]["id"]] * 2
    assert report_server.upserts[1]["spec"] == report_server.upserts[0]["spec"] | {
        "blocks": report_server.upserts[1]["spec"]["blocks"]}
    assert json.loads((tmp_path / REPORT_FILE).read_text())["url"] == first

    report_server.projects.append("other")  # another project: a report of its own
    save_wandb_report(summary, tmp_path, "other", "ent")
    assert report_server.upserts[2]["id"] != report_server.upserts[0]["id"]


def test_a_project_that_w_and_b_does_not_hold_is_an_error(smoke_sweep, report_server, tmp_path):
    config, summary = smoke_sweep
    with pytest.raises(ValueError, match="'ent/missing' not found"):
        save_wandb_report(summary, tmp_path, "missing", "ent")
    assert not (tmp_path / REPORT_FILE).exists()


def test_an_online_sweeps_report_task_warns_instead_of_failing_the_sweep(smoke_sweep, report_server, tmp_path):
    """The flow's step for online sweeps: the URL for the summary, or the reason there is none."""
    config, summary = smoke_sweep

    @flow
    def finish(project: str) -> dict:
        return save_wandb_report_task(summary, tmp_path, project, "ent")

    saved = finish("proj")
    assert saved == {"report_url": json.loads((tmp_path / REPORT_FILE).read_text())["url"]}
    assert f"- W&B report: {saved['report_url']}" in wandb_lines(summary | {"wandb": summary["wandb"] | saved})
    failed = finish("missing")
    assert "'ent/missing' not found" in failed["report_error"]
    assert "W&B report could not be saved" in "\n".join(wandb_lines(summary | {"wandb": summary["wandb"] | failed}))


def test_the_saved_spec_reads_back_as_the_report_that_was_built(smoke_sweep, report_server, tmp_path):
    """What `Report.from_url` does with the view W&B returns (wandb-workspaces' own parser), on the
    spec that was sent: the live test makes the same checks against a real W&B."""
    config, summary = smoke_sweep
    save_wandb_report(summary, tmp_path, "proj", "ent")
    [upsert] = report_server.upserts
    view = internal.ReportViewspec.model_validate({
        "id": upsert["id"], "displayName": upsert["displayName"], "spec": json.dumps(upsert["spec"]),
        "project": {"name": "proj", "entityName": "ent"}})
    report = wr.Report._from_model(view)
    assert summary["sweep_id"] in report.title
    [grid] = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    assert [[metric.name for metric in panel.y] for panel in grid.panels] == [[key] for key, _ in CURVES]
    assert grid.runsets[0].groupby[0].startswith("config.learning_rate") and summary["sweep_id"] in str(grid.runsets[0].filters)
