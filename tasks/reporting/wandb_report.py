"""The sweep as a W&B report (wandb-workspaces): its verdict, the four curves of its runs grouped
by learning rate (the mean over seeds with a ±1 std band), the comparison table and the promotion.

Built from summary.json alone, so one function serves both ways a sweep reaches W&B: an online
sweep saves its report when it finishes, an offline one when `lr-sweep publish` has synced its
runs. The report's id is kept in SWEEP_DIR/wandb_report.json: saving again (a second publish)
updates that report instead of adding another one to the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import wandb
import wandb_workspaces.reports.v2 as wr
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from wandb_workspaces import expr

from models.files import atomic_write
from tasks.reporting.charts import CURVES
from tasks.reporting.report import aggregates_markdown, header_lines, promotion_lines, search_lines, trials_markdown, verdict
from tasks.reporting.tracking import TRAIN_JOB_TYPE

REPORT_FILE = "wandb_report.json"
# W&B's report grid is 24 units wide: the curves two by two (the four metrics, then the rate).
PANEL_WIDTH, PANEL_HEIGHT = 12, 8


def curve_panels() -> list[wr.LinePlot]:
    """One chart per curve, a line per learning rate: the mean over its seeds, a ±1 std band."""
    return [wr.LinePlot(title=title, x="epoch", y=[key], groupby="config.learning_rate",
                        groupby_aggfunc="mean", groupby_rangefunc="stddev",
                        layout=wr.Layout(x=PANEL_WIDTH * (n % 2), y=PANEL_HEIGHT * (n // 2),
                                         w=PANEL_WIDTH, h=PANEL_HEIGHT))
            for n, (key, title) in enumerate(CURVES)]


def sweep_runset(summary: dict, project: str, entity: str) -> wr.Runset:
    """The sweep's training runs (its W&B group), grouped by learning rate."""
    return wr.Runset(entity=entity, project=project, name=f"sweep {summary['sweep_id']}",
                     filters=expr.And(expr.Metric("Group") == summary["sweep_id"],
                                           expr.Metric("JobType") == TRAIN_JOB_TYPE),
                     groupby=["config.learning_rate"])


def build_wandb_report(summary: dict, project: str, entity: str) -> wr.Report:
    """The report's blocks, in the order of report.md (its charts drawn by W&B from the runs)."""
    metric = summary["config"]["selection_metric"]
    blocks = [wr.MarkdownBlock(text="\n".join(header_lines(summary))),
              wr.H1(text="Verdict"),
              wr.MarkdownBlock(text="\n".join(f"- {line}" for line in verdict(summary, metric))),
              wr.H1(text="Curves"),
              wr.P(text="Each line is one learning rate: the mean over its seeds, the band ±1 standard deviation."),
              wr.PanelGrid(runsets=[sweep_runset(summary, project, entity)], panels=curve_panels()),
              wr.H1(text="Trials"),
              wr.MarkdownBlock(text="\n".join(trials_markdown(summary)))]
    if summary["aggregates"]:
        blocks += [wr.H2(text="Per learning rate (over seeds)"),
                   wr.MarkdownBlock(text="\n".join(aggregates_markdown(summary)))]
    blocks += [wr.H1(text="Promotion"), wr.MarkdownBlock(text="\n".join(promotion_lines(summary)))]
    if summary.get("search"):
        blocks += [wr.H1(text="Search"), wr.MarkdownBlock(text="\n".join(search_lines(summary["search"])))]
    smoke = " (smoke run)" if summary["smoke"] else ""
    return wr.Report(project=project, entity=entity, title=f"Learning-rate sweep {summary['sweep_id']}{smoke}",
                     description=f"{len(summary['trials'])} trials of {summary['dataset']['name']}, "
                                 f"selected by {metric}", blocks=blocks)


def save_wandb_report(summary: dict, sweep_dir: Path | str, project: str, entity: str | None) -> str:
    """Save the sweep's report in W&B (updating the one saved before, if any); returns its URL."""
    entity = entity or wandb.Api().default_entity
    record_path = Path(sweep_dir) / REPORT_FILE
    report = build_wandb_report(summary, project, entity)
    if record_path.exists():
        saved = json.loads(record_path.read_text())
        if (saved.get("project"), saved.get("entity")) == (project, entity):
            report.id = saved["id"]
    report.save()
    url = report.url  # each read asks the API for the app's address
    atomic_write(record_path, json.dumps({"id": report.id, "url": url, "project": project,
                                          "entity": entity}, indent=2) + "\n")
    return url


@task(name="save_wandb_report", task_run_name="save W&B report", cache_policy=NO_CACHE)
def save_wandb_report_task(summary: dict, sweep_dir: Path, project: str, entity: str | None) -> dict:
    """An online sweep's report. It is a view of runs that are already in W&B, so failing to save it
    loses nothing: the sweep goes on, and the summary says why there is no report."""
    try:
        url = save_wandb_report(summary, sweep_dir, project, entity)
    except Exception as error:
        get_run_logger().warning(f"the W&B report of sweep {summary['sweep_id']} could not be saved: {error}")
        return {"report_error": str(error)}
    get_run_logger().info(f"W&B report: {url}")
    return {"report_url": url}
