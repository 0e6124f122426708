"""The reproduction studies' machinery: a study is a set of `train.py -m` sweeps over seeds and a
claim from a paper; this runs its sweeps, reads back their jobs and logged scalars, and writes
its section of docs/results.md (claim, commands, tables, verdicts)."""

from __future__ import annotations

import functools
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moelab.sweeps.jobs import collect_jobs
from moelab.sweeps.report import group_jobs, read_scalars, spread, write_report
from moelab.sweeps.statistics import ALPHA, Welch, holm, verdict, welch

# The source checkout the studies run in: they start `python train.py` jobs there and write
# its docs/ pages.
ROOT = Path(__file__).resolve().parents[3]
COMMON = ["callbacks.progress=null"]
# --quick: every run a few steps (and the LM a tiny one), to check a study end to end.
QUICK = ["debug=default", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1"]
QUICK_LM = ["data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000", "model.d_model=32", "model.ffn_hidden=64",
            "model.depth=2", "model.num_heads=2", "task.sample_tokens=4"]


@dataclass
class Sweep:
    """One multirun: fixed overrides plus axes (key → values), crossed with the seeds."""

    name: str
    fixed: list[str]
    axes: dict[str, list[str]] = field(default_factory=dict)
    language: bool = False
    source: str | None = None  # "<study>/<sweep>": read that study's runs instead of running
    pick: dict[str, str] = field(default_factory=dict)  # the job to read: overrides it must have

    def arguments(self, seeds: int, quick: bool, out: Path | None = None) -> list[str]:
        """The multirun's overrides; `{out}` in a fixed override becomes the sweeps' folder."""
        axes = {k: (v[:2] if quick else v) for k, v in self.axes.items()}
        fixed = [f.replace("{out}", str(out)) for f in self.fixed] if out is not None else self.fixed
        args = [*fixed, *COMMON, *(f"{k}={','.join(v)}" for k, v in axes.items())]
        if quick:
            args += QUICK + (QUICK_LM if self.language else [])
        return ["-m", *args, f"seed={','.join(str(s) for s in range(seeds))}"]


@dataclass
class Study:
    name: str
    title: str
    claim: str
    sweeps: list[Sweep]
    metrics: list[str]
    seeds: int = 3
    extra: Callable[["Context"], list[str]] | None = None  # more Markdown from the runs
    default: bool = True  # in the default set (the ≤ 90-minute one); others run when named


@dataclass
class Context:
    study: Study
    folders: dict[str, Path]  # sweep name → multirun folder
    figures: Path  # where this page's figures go
    quick: bool


@functools.lru_cache(maxsize=None)
def job_scalars(job_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A job's TensorBoard scalars, read once per job however many statistics use them."""
    return read_scalars(job_dir)


def last_layer_mean(job_dir: Path, name: str) -> float | None:
    """The last logged value of `moe/layer<i>/<name>`, averaged over MoE layers."""
    scalars = job_scalars(job_dir)
    values = [points[-1][1] for tag, points in scalars.items() if tag.startswith("moe/layer") and tag.endswith(f"/{name}")]
    return sum(values) / len(values) if values else None


def routing_table(context: Context, names: dict[str, str]) -> list[str]:
    """Mean ± std over seeds of the final per-layer routing statistics `names` (tag → header)."""
    lines = []
    for sweep, folder in context.folders.items():
        jobs = collect_jobs(folder)
        for job in jobs:
            for tag in names:
                job["metrics"][f"final {tag}"] = last_layer_mean(folder / job["job"], tag)
        groups = group_jobs(jobs)
        header = [*groups[0].varying, *names.values()]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in groups:
            cells = [group.overrides.get(k, "") for k in group.varying]
            cells += [str(spread([j["metrics"][f"final {tag}"] for j in group.jobs])) for tag in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def values_by_group(context: Context, sweep: str, metric: str) -> dict[str, list[float]]:
    """Group label (the varying overrides, or "all") → the metric's values over seeds; a
    `final <tag>` metric reads the last logged per-layer value (mean over layers)."""
    out = {}
    for group in group_jobs(collect_jobs(context.folders[sweep])):
        values = []
        for job in group.jobs:
            if metric.startswith("final "):
                value = last_layer_mean(context.folders[sweep] / job["job"], metric.removeprefix("final "))
            else:
                value = job["metrics"].get(metric)
            if value is not None:
                values.append(float(value))
        out[" ".join(group.overrides.get(k, "") for k in group.varying) or "all"] = values
    return out


class Comparisons:
    """The comparisons one verdict makes, tested as one family: Welch's t-test each (the
    difference of means with its 95 % interval), Holm's correction over all of them, and a
    verdict at α = 0.05 from the adjusted p (moelab.sweeps.statistics)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Welch | None]] = []

    def add(self, label: str, a: list[float], b: list[float]) -> int:
        self.items.append((label, welch(a, b)))
        return len(self.items) - 1

    def adjusted(self) -> list[float | None]:
        tested = [test.p for _, test in self.items if test is not None]
        holm_p = iter(holm(tested))
        return [next(holm_p) if test is not None else None for _, test in self.items]

    def difference(self, index: int) -> float:
        test = self.items[index][1]
        return math.nan if test is None else test.difference

    def holds(self, index: int, sign: int) -> bool:
        """Whether comparison `index` is significant at α after Holm, in the direction `sign`."""
        test, p = self.items[index][1], self.adjusted()[index]
        return test is not None and p is not None and p < ALPHA and math.copysign(1, test.difference) == sign

    def text(self, index: int) -> str:
        label, test = self.items[index]
        p = self.adjusted()[index]
        if test is None:
            return f"{label}: one seed, no test"
        return f"{label} = {test} → {verdict(test, p)}"


def fmt(values: list[float]) -> str:
    return str(spread(values))


def final_by_seed(c: Context, sweep: str, metric: str, pick: dict[str, str] | None = None) -> dict[str, float]:
    """seed → the metric, for the jobs of `sweep` that have the `pick` overrides."""
    jobs = [j for j in collect_jobs(c.folders[sweep]) if (pick or {}).items() <= j["overrides"].items()]
    return {j["overrides"].get("seed", "0"): j["metrics"][metric] for j in jobs if j["metrics"].get(metric) is not None}


def curve(c: Context, sweep: str, tag: str, pick: dict[str, str] | None = None, offset: int = 0) -> tuple[list, list]:
    """Mean over the sweep's (picked) jobs of a logged scalar, by step (+ offset)."""
    by_step: dict[int, list[float]] = {}
    for job in collect_jobs(c.folders[sweep]):
        if (pick or {}).items() <= job["overrides"].items():
            for step, value in job_scalars(c.folders[sweep] / job["job"]).get(tag, []):
                by_step.setdefault(step + offset, []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def both(*parts: Callable[[Context], list[str]]) -> Callable[[Context], list[str]]:
    """The parts' lines in turn; a part that lacks its settings says so and the rest go on."""

    def run(c: Context) -> list[str]:
        lines = []
        for part in parts:
            try:
                lines += part(c)
            except (KeyError, statistics.StatisticsError) as missing:
                lines += [f"*(No verdict: this run lacks the setting or values it compares: {missing}.)*", ""]
        return lines

    return run


def copy_figure(context: Context, sweep: str, figure: str, caption: str) -> list[str]:
    source = context.folders[sweep] / "report" / figure
    if not source.exists():
        return [f"*(figure {figure} not produced by this run)*", ""]
    target = context.figures / f"{context.study.name}_{sweep}_{figure}"
    shutil.copyfile(source, target)
    return [f"![{caption}](results/{target.name})", ""]


def run_sweep(sweep: Sweep, folder: Path, seeds: int, quick: bool, timings: dict[str, float]) -> str:
    """Run one multirun into `folder` and record its wall time (minutes) in `timings`."""
    args = [sys.executable, "train.py", *sweep.arguments(seeds, quick, folder.parent.parent), f"hydra.sweep.dir={folder}"]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    timings[folder.parent.name + "/" + folder.name] = round(minutes, 2)
    status = "ok" if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"
    print(f"  {sweep.name}: {minutes:.1f} min, {status}", flush=True)
    if not folder.is_dir():
        raise SystemExit(f"moelab: error: the {sweep.name} sweep made no folder: {result.stderr.strip()[-500:]}")
    if not (folder / "report.md").exists():
        write_report(folder)
    return " ".join(["python train.py", *sweep.arguments(seeds, quick, shown_path(folder.parent.parent))])


def shown_path(path: Path) -> Path:
    """`path` relative to the repository when inside it (for commands shown on the page)."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def study_section(study: Study, context: Context, commands: list[str], steps: str, minutes: float | None) -> str:
    lines = [f"## {study.title}", "", f"**Claim.** {study.claim}", ""]
    if commands:
        took = f" Wall time of its sweeps: {minutes:.1f} min." if minutes is not None else ""
        lines += ["```bash", *commands, "```", "", f"Seeds: {context_seeds(context)}. {steps}{took}", ""]
    sourced = sorted({s.source.split("/")[0] for s in study.sweeps if s.source})
    if sourced:
        lines += ["Reads the runs of the " + " and ".join(f"`{name}`" for name in sourced) + " studies above.", ""]
    for sweep, folder in context.folders.items() if study.metrics else ():
        jobs = collect_jobs(folder)
        groups = group_jobs(jobs)
        header = [*groups[0].varying, "n", "FFN FLOPs / dense", *study.metrics]
        lines += [f"`{sweep}`:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in groups:
            cells = [group.overrides.get(k, "") for k in group.varying] + [str(len(group.jobs))]
            cells.append(flops_cell(folder / group.jobs[0]["job"]))
            cells += [str(spread([j["metrics"].get(m) for j in group.jobs])) for m in study.metrics]
            lines.append("| " + " | ".join(cells) + " |")
        failed = [j["job"] for j in jobs if j["status"] != "ok"]
        if failed:
            lines.append(f"\nJobs that did not end ok: {', '.join(failed)} (see {folder}/summary.md).")
        lines.append("")
    if study.extra is not None:
        try:
            lines += study.extra(context)
        except (KeyError, statistics.StatisticsError) as missing:  # quick grids, or a setting with no finished job
            lines += [f"*(No verdict: this run lacks the setting or values it compares: {missing}.)*", ""]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def arm_flops(job_dir: Path) -> float | None:
    """A job's FFN FLOPs per token ÷ its dense twin's, counted on one forward of each model
    its stored config builds (moelab.models.flops); None if it has no config."""
    from omegaconf import OmegaConf

    from moelab.models.flops import ffn_flops_ratio
    from moelab.models.targets import check_targets

    stored = job_dir / ".hydra" / "config.yaml"
    if not stored.is_file():
        return None
    config = OmegaConf.load(stored)
    check_targets(config, str(stored))  # a run folder's config is a file: data, not code
    return ffn_flops_ratio(config)["ffn"]


def flops_cell(job_dir: Path) -> str:
    ratio = arm_flops(job_dir)
    return "—" if ratio is None else f"{ratio:.2f}"


def context_seeds(context: Context) -> str:
    seeds = sorted({j["overrides"].get("seed", "0") for f in context.folders.values() for j in collect_jobs(f)}, key=int)
    return ", ".join(seeds)
