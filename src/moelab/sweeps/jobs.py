"""A sweep folder read back: one record per job (its overrides, status and final metrics from
its metrics.json), and the order metrics are shown in. Light: no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from moelab.run.names import parse_override
from moelab.run.records import METRICS_FILE, read_record

METRIC_ORDER = ("val/", "test/", "train/")


def _job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder of a sweep: {"job", "dir", "overrides": {key: value}, "metrics":
    {name: float | None}, "status", "reason"} (a job without metrics.json is an error)."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_sort_key(p.parents[1])):
        job_dir = overrides_file.parents[1]
        overrides = dict(parse_override(o) for o in (yaml.safe_load(overrides_file.read_text()) or []))
        record = read_record(job_dir / METRICS_FILE)
        jobs.append({"job": job_dir.name, "dir": str(job_dir), "overrides": overrides, "metrics": record["metrics"],
                     "status": record["status"], "reason": record["reason"] or ""})
    return jobs


def metric_names(jobs: list[dict[str, Any]], wanted: Sequence[str] | None) -> list[str]:
    if wanted:
        return list(wanted)
    names = {name for job in jobs for name in job["metrics"]}

    def order(name: str) -> tuple[int, str]:
        prefix = next((i for i, p in enumerate(METRIC_ORDER) if name.startswith(p)), len(METRIC_ORDER))
        return prefix, name

    return sorted(names, key=order)
