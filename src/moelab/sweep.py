"""Hydra multirun support: TensorBoard run names from the overrides, and a summary table
(overrides → final metrics) written to the sweep folder when a multirun ends."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

METRIC_ORDER = ("val/", "test/", "train/")


def run_version() -> str:
    """TensorBoard `version` for this job: `hydra.job.override_dirname` (e.g.
    `experts=16,router=switch`) inside a multirun, so `tensorboard --logdir <sweep folder>`
    names each run by its overrides; "" in a single run (logs go straight to `tensorboard/`)."""
    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    return str(hydra_cfg.job.override_dirname).replace("/", "_")[:200]


OmegaConf.register_new_resolver("moelab.run_version", run_version, replace=True)


def parse_override(override: str) -> tuple[str, str]:
    """`router=topk` → ("router", "topk"); `+a.b=1` → ("a.b", "1"); `~key` → ("key", "(deleted)")."""
    if override.startswith("~"):
        return override.lstrip("~").split("=", 1)[0], "(deleted)"
    key, _, value = override.lstrip("+").partition("=")
    return key, value


def _job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder of a sweep: {"job", "overrides": {key: value}, "metrics": {...}}."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_sort_key(p.parents[1])):
        job_dir = overrides_file.parents[1]
        overrides = dict(parse_override(o) for o in (yaml.safe_load(overrides_file.read_text()) or []))
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        jobs.append({"job": job_dir.name, "overrides": overrides, "metrics": metrics})
    return jobs


def _metric_names(jobs: list[dict[str, Any]], wanted: Sequence[str] | None) -> list[str]:
    if wanted:
        return list(wanted)
    names = {name for job in jobs for name in job["metrics"]}

    def order(name: str) -> tuple[int, str]:
        prefix = next((i for i, p in enumerate(METRIC_ORDER) if name.startswith(p)), len(METRIC_ORDER))
        return prefix, name

    return sorted(names, key=order)


def summary_table(jobs: list[dict[str, Any]], metrics: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows): job number, every override key, then the metrics (full precision)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys]
    names = _metric_names(jobs, metrics)
    header = ["job", *keys, *names]
    rows = []
    for job in jobs:
        values = [job["overrides"].get(k, "") for k in keys]
        values += ["" if job["metrics"].get(n) is None else repr(float(job["metrics"][n])) for n in names]
        rows.append([job["job"], *values])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]], num_override_columns: int) -> str:
    """Markdown: overrides that differ between jobs, metrics to 4 significant digits; overrides
    shared by every job are listed once above the table."""
    override_cols = range(1, 1 + num_override_columns)
    shared = [c for c in override_cols if rows and len({r[c] for r in rows}) == 1]
    keep = [c for c in range(len(header)) if c not in shared]
    lines = []
    if shared:
        lines.append("Shared overrides: " + " ".join(f"`{header[c]}={rows[0][c]}`" for c in shared) + "\n")
    lines.append("| " + " | ".join(header[c] for c in keep) + " |")
    lines.append("|" + "---|" * len(keep))
    for row in rows:
        cells = [row[c] if c <= num_override_columns else (f"{float(row[c]):.4g}" if row[c] else "—") for c in keep]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, metrics: Sequence[str] | None = None) -> str:
    """Write `summary.csv` and `summary.md` into the sweep folder; return the Markdown."""
    jobs = collect_jobs(sweep_dir)
    header, rows = summary_table(jobs, metrics)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    num_override_columns = len({k for job in jobs for k in job["overrides"]})
    markdown = markdown_table(header, rows, num_override_columns)
    (sweep_dir / "summary.md").write_text(f"# Sweep summary: {sweep_dir}\n\n{markdown}")
    return markdown


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, `summary.csv` and `summary.md` (one row per job:
    overrides → final metrics from each job's `metrics.json`) in the sweep folder, and the table
    printed. `metrics`: the columns to show (default: every metric any job logged)."""

    def __init__(self, metrics: Sequence[str] | None = None) -> None:
        self.metrics = list(metrics) if metrics else None
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolve now: `${now:...}` in the sweep dir must give the folder the launcher uses.
        self._sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self._sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            print(f"moelab: no sweep folder at {sweep_dir}: no summary written")
            return
        markdown = write_summary(sweep_dir, self.metrics)
        print(f"\nSweep summary ({sweep_dir}/summary.csv, summary.md):\n\n{markdown}", flush=True)
