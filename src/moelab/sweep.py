"""Hydra multirun support: TensorBoard run names from the overrides, and a summary table
(overrides → status and final metrics) written to the sweep folder when a multirun ends; a
multirun in which any job did not end ok exits non-zero after the summary."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moelab.runs import METRICS_FILE, OK, read_record

METRIC_ORDER = ("val/", "test/", "train/")


# The command line as launched (before moelab.train rewrites sys.argv for relaunched ranks):
# a multirun's own overrides, to tell the keys every job shares from the swept ones.
LAUNCH_ARGS = list(sys.argv[1:])
# Overrides that say where a run reads or writes, not what it is: never in a run's name.
UNNAMED_KEYS = ("ckpt_path",)


def shared_override_keys(args: Sequence[str]) -> set[str]:
    """Keys a multirun's command line sets to one value (`debug=default`, `seed=0`), so every
    job has them: everything that is not a sweep (`a,b`, `range(...)`, `choice(...)`, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a name is cosmetic: name runs by all their overrides
        return set()
    return {o.key_or_group for o in parsed if not o.is_sweep_override()}


def run_name(overrides: Sequence[str], leave_out: set[str] = frozenset()) -> str:
    """`experts=16,router=switch`: the overrides (sorted, as Hydra's override_dirname), without
    `leave_out` and UNNAMED_KEYS, with no `/` (a folder level) and at most 200 characters."""
    kept = sorted(o for o in overrides if parse_override(o)[0] not in leave_out | set(UNNAMED_KEYS))
    return ",".join(kept).replace("/", "_")[:200]


def run_version() -> str:
    """TensorBoard `version` for this job: its overrides without those every job of the
    multirun shares (e.g. `experts=16,router=switch`), so `tensorboard --logdir <sweep folder>`
    names each run by what sets it apart; "" in a single run (logs go straight to
    `tensorboard/`; the run's folder carries its overrides: `run_folder_suffix`)."""
    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    return run_name(list(hydra_cfg.overrides.task), shared_override_keys(LAUNCH_ARGS)) or str(hydra_cfg.job.num)


def run_folder_suffix(override_dirname: str = "") -> str:
    """`_<overrides>` for a single run's folder name (`outputs/runs/<time>_experts=16,router=switch`),
    "" without overrides: `hydra.run.dir` interpolates it with `hydra.job.override_dirname`."""
    if not HydraConfig.initialized():
        return ""
    name = run_name(list(HydraConfig.get().overrides.task))
    return f"_{name[:120]}" if name else ""


OmegaConf.register_new_resolver("moelab.run_version", run_version, replace=True)
OmegaConf.register_new_resolver("moelab.run_folder_suffix", run_folder_suffix, replace=True)


def parse_override(override: str) -> tuple[str, str]:
    """`router=topk` → ("router", "topk"); `+a.b=1` → ("a.b", "1"); `~key` → ("key", "(deleted)")."""
    if override.startswith("~"):
        return override.lstrip("~").split("=", 1)[0], "(deleted)"
    key, _, value = override.lstrip("+").partition("=")
    return key, value


def _job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder of a sweep: {"job", "overrides": {key: value}, "metrics":
    {name: float | None}, "status", "reason"} (a job without metrics.json is an error)."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_sort_key(p.parents[1])):
        job_dir = overrides_file.parents[1]
        overrides = dict(parse_override(o) for o in (yaml.safe_load(overrides_file.read_text()) or []))
        record = read_record(job_dir / METRICS_FILE)
        jobs.append({"job": job_dir.name, "overrides": overrides, "metrics": record["metrics"],
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
    """Write `summary.csv` and `summary.md` into the sweep folder; return the Markdown and
    the jobs' records."""
    jobs = collect_jobs(sweep_dir)
    header, rows = summary_table(jobs, metrics)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    num_override_columns = len({k for job in jobs for k in job["overrides"]})
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
        sweep_dir = self._sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            print(f"moelab: no sweep folder at {sweep_dir}: no summary written")
            return
        markdown, jobs = write_summary(sweep_dir, self.metrics)
        print(f"\nSweep summary ({sweep_dir}/summary.csv, summary.md):\n\n{markdown}", flush=True)
        from moelab.report import write_report  # it imports this module

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
