"""The end of a Hydra multirun: a summary table (overrides → status and final metrics) written
to the sweep folder and printed, then the sweep report; a multirun in which any job did not
end ok exits non-zero after both."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moelab.run.records import OK
from moelab.sweeps.jobs import collect_jobs, metric_names
from moelab.sweeps.report import write_report


def summary_table(jobs: list[dict[str, Any]], metrics: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows): job number, every override key, status, the metrics (full precision;
    empty where a job has none), and the one-line reason of a job that did not end ok."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys]
    names = metric_names(jobs, metrics)
    header = ["job", *keys, "status", *names, "reason"]
    rows = []
    for job in jobs:
        values = [job["overrides"].get(k, "") for k in keys]
        values.append(job["status"])
        values += ["" if job["metrics"].get(n) is None else repr(float(job["metrics"][n])) for n in names]
        values.append(job["reason"])
        rows.append([job["job"], *values])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]], num_override_columns: int) -> str:
    """Markdown: overrides that differ between jobs, status (with the reason when not ok),
    metrics to 4 significant digits; overrides shared by every job are listed once above."""
    override_cols = range(1, 1 + num_override_columns)
    status_col, reason_col = 1 + num_override_columns, len(header) - 1
    shared = [c for c in override_cols if rows and len({r[c] for r in rows}) == 1]
    keep = [c for c in range(len(header) - 1) if c not in shared]
    lines = []
    if shared:
        lines.append("Shared overrides: " + " ".join(f"`{header[c]}={rows[0][c]}`" for c in shared) + "\n")
    lines.append("| " + " | ".join(header[c] for c in keep) + " |")
    lines.append("|" + "---|" * len(keep))
    for row in rows:
        cells = []
        for c in keep:
            if c < status_col:
                cells.append(row[c])
            elif c == status_col:
                reason = row[reason_col].replace("|", "\\|")
                cells.append(row[c] if not reason else f"{row[c]}: {reason}")
            else:
                cells.append(f"{float(row[c]):.4g}" if row[c] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, metrics: Sequence[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Write `summary.csv` (every metric, full precision) and `summary.md` (the val/ and test/
    metrics a sweep compares, or `metrics`) into the sweep folder; return the Markdown and
    the jobs' records."""
    jobs = collect_jobs(sweep_dir)
    header, rows = summary_table(jobs, metrics)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    num_override_columns = len({k for job in jobs for k in job["overrides"]})
    shown = metrics or [name for name in metric_names(jobs, None)
                        if name.startswith(("val/", "test/")) and "/aux" not in name]
    header, rows = summary_table(jobs, shown or None)
    markdown = markdown_table(header, rows, num_override_columns)
    (sweep_dir / "summary.md").write_text(f"# Sweep summary: {sweep_dir}\n\n{markdown}")
    return markdown, jobs


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, `summary.csv` and `summary.md` (one row per job:
    overrides → status and final metrics from each job's `metrics.json`) in the sweep folder,
    and the table printed; then `report.md` with figures (moelab.report: seeds grouped, mean ±
    std, learning and routing curves); then exit 1 if any job did not end ok. `metrics`: the columns to
    show (default: every metric any job logged)."""

    def __init__(self, metrics: Sequence[str] | None = None) -> None:
        self.metrics = list(metrics) if metrics else None
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolve now: `${now:...}` in the sweep dir must give the folder the launcher uses.
        self._sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from moelab.run.quiet import quiet_third_party

        quiet_third_party(bool(config.hydra.get("verbose")))  # reading the event files: no watcher lines
        sweep_dir = self._sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            print(f"moelab: no sweep folder at {sweep_dir}: no summary written")
            return
        markdown, jobs = write_summary(sweep_dir, self.metrics)
        print(f"\nSweep summary ({sweep_dir}/summary.csv, summary.md):\n\n{markdown}", flush=True)
        try:
            report = write_report(sweep_dir, self.metrics)
            print(f"Sweep report with figures: {report}", flush=True)
        except Exception as error:  # the summary stands; a report failure must not hide it
            print(f"moelab: warning: no sweep report ({type(error).__name__}: {error})", flush=True)
        failed = [job for job in jobs if job["status"] != OK]
        if failed:
            # Hydra carries on past a failed job and would end the multirun with exit 0.
            names = ", ".join(f"{job['job']} ({job['status']})" for job in failed)
            raise SystemExit(f"moelab: error: {len(failed)} of {len(jobs)} jobs did not end ok: {names}; see {sweep_dir}/summary.md")
