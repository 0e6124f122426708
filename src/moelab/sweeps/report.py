"""Sweep reports: what a multirun showed, with its spread over seeds.

    python -m moelab.report <sweep folder> [--metrics val/acc test/acc ...] [--baseline model.moe_every=0]

Writes `report.md` and PNG figures (under `report/`) into the sweep folder:
- final metrics grouped over the `seed` override, as mean ± std, the mean's 95 % t interval
  and n (jobs that differ only in `seed` form one group; std is the sample std);
- with `--baseline KEY=VALUE ...`, every other group against that one: the difference of
  means with its 95 % interval, Welch's t-test p-value, Holm's adjusted p over the table;
- learning curves of every job, from its TensorBoard event files (one colour per group);
- per MoE layer, the load balance (max/mean tokens per expert) and the router entropy over
  training.
A metric some jobs of a group lack is reported with how many lack it; a group where no job
has it shows "missing". Works on any multirun folder (grid sweeps and `hparams_search=optuna`
alike); SweepSummary writes it at the end of every multirun.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moelab.sweeps.jobs import collect_jobs, metric_names
from moelab.sweeps.statistics import holm, t_interval, verdict, welch

REPORT_FILE = "report.md"
FIGURES = "report"
GROUPED_OUT = ("seed",)
ROUTING_CURVES = {"load_max_over_mean": "load max/mean (1 = balanced)", "router_entropy": "router entropy (nats)"}
LAYER_TAG = re.compile(r"^moe/layer(\d+)/(\w+)$")


@dataclass
class Group:
    """Jobs whose overrides agree except for `seed`."""

    overrides: dict[str, str]
    jobs: list[dict[str, Any]] = field(default_factory=list)
    varying: tuple[str, ...] = ()  # the override keys that tell this group from the others

    @property
    def label(self) -> str:
        return " ".join(f"{k}={self.overrides.get(k, '')}" for k in self.varying) or "(all jobs)"

    @property
    def seeds(self) -> list[str]:
        return [job["overrides"].get("seed", "default") for job in self.jobs]


@dataclass
class Spread:
    """A metric over a group's jobs: mean, sample std (None for one value), n with a value,
    how many jobs have none, the values, and the mean's 95 % t interval (two values or more)."""

    mean: float | None
    std: float | None
    n: int
    missing: int
    values: tuple[float, ...] = ()

    @property
    def interval(self) -> tuple[float, float] | None:
        return t_interval(self.values)

    def __str__(self) -> str:
        if self.n == 0:
            return "missing"
        text = f"{self.mean:.4g}" if self.std is None else f"{self.mean:.4g} ± {self.std:.2g}"
        if self.interval is not None:
            text += f" [{self.interval[0]:.4g}, {self.interval[1]:.4g}]"
        text += f" (n={self.n})"
        return text + (f", missing in {self.missing}" if self.missing else "")


def group_jobs(jobs: list[dict[str, Any]], grouped_out: Sequence[str] = GROUPED_OUT) -> list[Group]:
    """Jobs grouped by their overrides without `grouped_out`, in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for job in jobs:
        kept = {k: v for k, v in job["overrides"].items() if k not in grouped_out}
        key = tuple(sorted(kept.items()))
        groups.setdefault(key, Group(kept)).jobs.append(job)
    keys: list[str] = []
    for group in groups.values():
        keys += [k for k in group.overrides if k not in keys]
    varying = tuple(k for k in keys if len({g.overrides.get(k) for g in groups.values()}) > 1)
    for group in groups.values():
        group.varying = varying
    return list(groups.values())


def shared_overrides(groups: list[Group]) -> dict[str, str]:
    """Overrides every group has with the same value."""
    first = groups[0].overrides
    return {k: v for k, v in first.items() if k not in groups[0].varying}


def spread(values: Sequence[float | None]) -> Spread:
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    missing = len(values) - len(present)
    if not present:
        return Spread(None, None, 0, missing)
    std = statistics.stdev(present) if len(present) > 1 else None
    return Spread(statistics.fmean(present), std, len(present), missing, tuple(present))


def metrics_markdown(groups: list[Group], names: Sequence[str]) -> str:
    """One row per group: the overrides that tell it apart, its seeds, each metric's spread."""
    keys = list(groups[0].varying)
    header = [*keys, "seeds", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        cells = [group.overrides.get(k, "") for k in keys]
        cells.append(", ".join(group.seeds))
        cells += [str(spread([job["metrics"].get(name) for job in group.jobs])) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons_markdown(groups: list[Group], names: Sequence[str], baseline: dict[str, str]) -> str:
    """Each group against the `baseline` group (the one whose overrides include it), per
    metric: the difference of means with its 95 % interval and Welch's p, Holm's adjusted p
    over the table's comparisons, and the verdict at α = 0.05."""
    base = next((g for g in groups if baseline.items() <= g.overrides.items()), None)
    if base is None:
        return f"No group has the baseline {' '.join(f'{k}={v}' for k, v in baseline.items())}.\n"
    rows = []
    for group in groups:
        if group is base:
            continue
        for name in names:
            arm = spread([job["metrics"].get(name) for job in group.jobs]).values
            reference = spread([job["metrics"].get(name) for job in base.jobs]).values
            rows.append((group.label, name, welch(arm, reference)))
    adjusted = holm([test.p for _, _, test in rows if test is not None])
    lines = [f"Against {base.label} (Welch's t-test, Holm's correction over the {len(adjusted)} comparisons):", "",
             "| arm | metric | difference (95 % CI, Welch p) | Holm p | verdict |", "|---|---|---|---|---|"]
    tested = iter(adjusted)
    for label, name, test in rows:
        p = next(tested) if test is not None else None
        lines.append(f"| {label} | {name} | {test if test is not None else '—'} | "
                     f"{'—' if p is None else f'{p:.2g}'} | {verdict(test, p)} |")
    return "\n".join(lines) + "\n"


def read_scalars(job_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a job logged to TensorBoard, tag → [(step, value)] sorted by step (for a
    step logged twice, e.g. by a resumed run, the later write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_tag: dict[str, dict[int, float]] = {}
    folders = sorted({p.parent for p in job_dir.rglob("events.out.tfevents*")})
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            for event in sorted(events.Scalars(tag), key=lambda e: e.wall_time):
                by_tag.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in by_tag.items()}


def _figure(rows: int = 1, cols: int = 1, width: float = 6.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_jobs(ax, groups: list[Group], scalars: dict[str, dict], tag: str) -> bool:
    """One line per job with `tag`, coloured by group (labelled once). False if none has it."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    drawn = False
    for g, group in enumerate(groups):
        labelled = False
        for job in group.jobs:
            points = scalars[job["job"]].get(tag)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, color=colours(g % 10), alpha=0.8, lw=1.2, marker="." if len(points) < 30 else None,
                    label=None if labelled else group.label)
            labelled = drawn = True
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return drawn


def write_figures(sweep_dir: Path, groups: list[Group], scalars: dict[str, dict]) -> list[tuple[str, Path]]:
    """Learning curves (val/* and train/loss) and per-layer routing curves; (title, path) each.
    A tag no job logged more than once (a sweep with one validation) has no curve: its value
    is in the tables."""
    out = sweep_dir / FIGURES
    out.mkdir(exist_ok=True)
    tags = sorted({tag for job_scalars in scalars.values() for tag in job_scalars})
    figures = []
    curves = [t for t in tags if (t.startswith("val/") or t == "train/loss")
              and any(len(job_scalars.get(t, ())) > 1 for job_scalars in scalars.values())]
    for tag in curves:
        fig, axes = _figure()
        ax = axes[0][0]
        if _plot_jobs(ax, groups, scalars, tag):
            ax.set(xlabel="step", ylabel=tag, title=tag)
            ax.legend(fontsize=7)
            path = out / f"curve_{tag.replace('/', '_')}.png"
            _save(fig, path)
            figures.append((f"Learning curve: {tag}", path))
    layers = sorted({int(m.group(1)) for t in tags if (m := LAYER_TAG.match(t))})
    for name, ylabel in ROUTING_CURVES.items():
        present = [i for i in layers if f"moe/layer{i}/{name}" in tags]
        if not present:
            continue
        fig, axes = _figure(1, len(present), width=5.0)
        for ax, layer in zip(axes[0], present):
            _plot_jobs(ax, groups, scalars, f"moe/layer{layer}/{name}")
            ax.set(xlabel="step", ylabel=ylabel, title=f"MoE layer {layer}")
        axes[0][0].legend(fontsize=7)
        path = out / f"routing_{name}.png"
        _save(fig, path)
        figures.append((f"Per layer: {ylabel}", path))
    return figures


def write_report(sweep_dir: Path | str, metrics: Sequence[str] | None = None,
                 baseline: dict[str, str] | None = None) -> Path:
    """Write `report.md` and its figures into `sweep_dir`; return the report's path. With a
    `baseline` (overrides that pick a group, e.g. {"model.moe_every": "0"}), every other group
    is compared with it (comparisons_markdown)."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(
            f"{sweep_dir} has no job folders with .hydra/overrides.yaml: pass a multirun folder "
            "(e.g. multirun/<date>/<time>)"
        )
    groups = group_jobs(jobs)
    names = metric_names(jobs, metrics)
    scalars = {job["job"]: read_scalars(sweep_dir / job["job"]) for job in jobs}
    figures = write_figures(sweep_dir, groups, scalars)
    not_ok = [f"{job['job']} ({job['status']})" for job in jobs if job["status"] != "ok"]
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"{len(jobs)} jobs in {len(groups)} groups (jobs that differ only in `seed` are one group). "
        "Each cell: mean ± sample std [95 % t interval of the mean] over the group's jobs (n = jobs with a value).",
    ]
    if not_ok:
        lines.append(f"Jobs that did not end ok (their last values are included): {', '.join(not_ok)}.")
    shared = shared_overrides(groups)
    lines += ["", "## Final metrics", ""]
    if shared:
        lines += ["Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in shared.items()), ""]
    lines.append(metrics_markdown(groups, names))
    if baseline:
        lines += ["## Comparisons", "", comparisons_markdown(groups, names, baseline)]
    if figures:
        lines += ["## Figures", ""]
        for title, path in figures:
            lines += [f"### {title}", "", f"![{title}]({path.relative_to(sweep_dir).as_posix()})", ""]
    report = sweep_dir / REPORT_FILE
    report.write_text("\n".join(lines))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (holds job folders 0, 1, ...)")
    parser.add_argument("--metrics", nargs="*", help="metrics to tabulate (default: every final metric)")
    parser.add_argument("--baseline", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the group every other is compared with (Welch's t-test, Holm's correction)")
    args = parser.parse_args(argv)
    baseline = dict(item.split("=", 1) for item in args.baseline or [])
    try:
        report = write_report(args.sweep_dir, args.metrics, baseline)
    except FileNotFoundError as error:
        print(f"moelab: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report} and its figures in {report.parent / FIGURES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
