"""Reproduction studies: the MoE literature's findings, re-measured with moelab on the bundled data.

    python scripts/reproduce.py                          # the default set, results in docs/results.md
    python scripts/reproduce.py --study upcycling        # a study outside the default set
    python scripts/reproduce.py --study capacity zloss   # some studies (the page keeps the others)
    python scripts/reproduce.py --seeds 5                # more seeds per setting
    python scripts/reproduce.py --quick                  # every study end to end in minutes (a smoke run)

Each study runs `train.py -m` multiruns (so every job is a normal moelab run, with its
metrics.json, TensorBoard events and a sweep report), then writes its section of
`docs/results.md` (figures in `docs/results/`): the paper's claim, the command, seeds and
steps, a table of mean ± std over seeds and what the numbers say. Sweeps land in
`outputs/reproduce/<study>/<sweep>/`; a study whose folders exist is not rerun unless
`--rerun`. `--quick` shortens every run and grid and writes to `outputs/reproduce_quick/`
instead, leaving docs/ alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moelab.report import group_jobs, read_scalars, spread, write_report  # noqa: E402
from moelab.sweep import collect_jobs  # noqa: E402

ROUTERS = sorted(p.stem for p in (ROOT / "conf" / "router").glob("*.yaml"))
COMMON = ["callbacks.progress=null"]
# Short LM schedule: 300 steps of 32 × 128 bytes (the experiment's own is 1000).
LM = ["experiment=lm_pystdlib", "data.train_steps_per_epoch=100", "trainer.max_epochs=3"]
LM_EPOCHS = lambda epochs: [*LM[:-1], f"trainer.max_epochs={epochs}"]  # noqa: E731 - 100 steps an epoch
# Upcycling's MoE: experts as wide as the dense FFN (copies), top-2: twice the dense FFN's FLOPs.
COPIES = ["model.expert_hidden=dense"]
# 8×8 digits as 64 patches of one pixel: four times the default ViT's 16 tokens per image.
PATCH1 = ["model.patch_size=1"]
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


def compare(a: list[float], b: list[float]) -> tuple[float, str]:
    """mean(a) − mean(b) and whether it exceeds two standard errors (Welch's, sample variances)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, "one seed: no error bar"
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    verdict = "beyond 2 standard errors" if abs(diff) > 2 * se else "within 2 standard errors (noise)"
    return diff, f"{verdict}, SE {se:.2g}"


def fmt(values: list[float]) -> str:
    return str(spread(values))


def verdict_moe_vs_dense(c: Context) -> list[str]:
    bpb = values_by_group(c, "lm", "val/bpb")
    moe, dense = bpb["2"], bpb["0"]
    diff, how = compare(moe, dense)
    holds = "agrees with the claim" if diff < 0 and "beyond" in how else "does not show the claim at this scale"
    return [f"**Measured.** val bpb MoE {fmt(moe)} vs dense {fmt(dense)}: MoE − dense = {diff:+.4f} ({how}). "
            f"This {holds}.", ""]


def verdict_expert_scaling(c: Context) -> list[str]:
    dense = values_by_group(c, "dense", "val/bpb")["all"]
    by_e = values_by_group(c, "experts", "val/bpb")
    order = sorted(by_e, key=int)
    means = [statistics.fmean(by_e[e]) for e in order]
    falls = all(b <= a for a, b in zip(means, means[1:]))
    text = ", ".join(f"E={e}: {m:.4f}" for e, m in zip(order, means))
    return [f"**Measured.** val bpb dense {statistics.fmean(dense):.4f}; {text}. The loss "
            f"{'falls with every doubling of E' if falls else 'does not fall monotonically with E'} "
            "(one seed per point: compare the gaps with the seed spread in the MoE-vs-dense study).", ""]


def verdict_statistic(sweep: str, statistic: str, shown: dict[str, str], better: str, worse: str,
                      quality: str) -> Callable[[Context], list[str]]:
    """A routing statistic's final value at the `shown` settings (setting → words), and
    val/acc at `better` minus at `worse`, described as `quality`."""

    def verdict(c: Context) -> list[str]:
        values = values_by_group(c, sweep, f"final {statistic}")
        acc = values_by_group(c, sweep, "val/acc")
        d_acc, how = compare(acc[better], acc[worse])
        at = ", ".join(f"{words} {fmt(values[setting])}" for setting, words in shown.items())
        return [f"**Measured.** {at}; {quality}: {d_acc:+.4f} ({how}).", ""]

    return verdict


verdict_balance = verdict_statistic(
    "weight", "load_max_over_mean", {"0": "final load max/mean without the loss", "0.01": "at 0.01", "0.1": "at 0.1"},
    "0.01", "0", "val/acc at 0.01 minus at 0")
verdict_zloss = verdict_statistic(
    "weight", "router_z", {"0": "final router z without z-loss", "0.001": "at 0.001", "0.01": "at 0.01"},
    "0.001", "0", "val/acc at 0.001 minus at 0")
verdict_capacity = verdict_statistic(
    "factor", "dropped_fraction", {"0.5": "dropped fraction at cf 0.5", "1.25": "1.25", "null": "dropless"},
    "null", "0.5", "val/acc dropless minus cf 0.5")


def verdict_routers(c: Context, against_topk: tuple[str, ...] = ("soft", "expert_choice", "noisy_topk")) -> list[str]:
    acc = values_by_group(c, "routers", "val/acc")
    twin = values_by_group(c, "dense_twin", "val/acc")["all"]
    ranked = sorted(acc, key=lambda r: -statistics.fmean(acc[r]))
    lines = ["**Measured.** Ranked by mean val/acc: " + ", ".join(f"{r} {statistics.fmean(acc[r]):.4f}" for r in ranked)
             + f"; dense twin {statistics.fmean(twin):.4f}."]
    for router in against_topk:
        diff, how = compare(acc[router], acc["topk"])
        lines.append(f"{router} − topk: {diff:+.4f} ({how}).")
    diff, how = compare(acc["topk"], twin)
    lines.append(f"topk − dense twin: {diff:+.4f} ({how}).")
    return [" ".join(lines), ""]


def verdict_noisy(c: Context) -> list[str]:
    acc = values_by_group(c, "losses", "val/acc")
    topk = values_by_group(c, "topk", "val/acc")["all"]
    parts = []
    for loss, values in acc.items():
        diff, how = compare(values, topk)
        parts.append(f"with loss={loss}: {fmt(values)}, minus topk {diff:+.4f} ({how})")
    return ["**Measured.** noisy_topk " + "; ".join(parts) + f". topk: {fmt(topk)}.", ""]


def verdict_soft(c: Context) -> list[str]:
    soft = values_by_group(c, "soft", "val/acc")
    topk = values_by_group(c, "topk", "val/acc")["all"]
    dense = values_by_group(c, "dense", "val/acc")["all"]
    parts = [f"soft, {p} slot(s) per expert: {fmt(v)} (minus topk {compare(v, topk)[0]:+.4f}, {compare(v, topk)[1]})"
             for p, v in soft.items()]
    return [f"**Measured** at 64 tokens per image: " + "; ".join(parts) + f"; topk {fmt(topk)}; dense twin {fmt(dense)}.", ""]


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


def verdict_upcycling(c: Context) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_pick = {"model.moe_every": "0"}
    # Where the dense runs stopped: their last logged step.
    last_steps = [max(step for points in job_scalars(c.folders["dense_200"] / j["job"]).values() for step, _ in points)
                  for j in collect_jobs(c.folders["dense_200"])]
    offset = round(statistics.fmean(last_steps))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, sweep, pick, shift in (("dense", "dense_300", dense_pick, 0), ("MoE from scratch", "moe_scratch", None, 0),
                                      ("dense, first part", "dense_200", None, 0), ("upcycled", "upcycled", None, offset)):
        steps, values = curve(c, sweep, "val/bpb", pick, shift)
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.axvline(offset, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training step (upcycled: counted from the dense run's start)")
    ax.set_ylabel("val/bpb (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    target = c.figures / f"{c.study.name}_val_bpb.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    upcycled = list(final_by_seed(c, "upcycled", "val/bpb").values())
    dense = list(final_by_seed(c, "dense_300", "val/bpb", dense_pick).values())
    scratch = list(final_by_seed(c, "moe_scratch", "val/bpb").values())
    parts = [f"final val bpb, upcycled after {offset} dense steps: {fmt(upcycled)}; dense all along {fmt(dense)}; "
             f"MoE from scratch {fmt(scratch)}"]
    for name, other in (("dense", dense), ("MoE from scratch", scratch)):
        diff, how = compare(upcycled, other)
        parts.append(f"upcycled − {name} {diff:+.4f} ({how})")
    return ["**Measured.** " + "; ".join(parts) + ".", "", f"![val bpb of the three ways](results/{target.name})", ""]


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


def specialisation_images(context: Context) -> list[str]:
    """The class × expert (ViT) and token category × expert (LM) heatmaps of the first job."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = []
    for sweep, folder in context.folders.items():
        pick = next(s.pick for s in context.study.sweeps if s.name == sweep)
        jobs = collect_jobs(folder)
        job = next((j for j in jobs if pick.items() <= j["overrides"].items()), jobs[0])
        job_dir = folder / job["job"]
        lines += [f"From `{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}` job {job['job']} "
                  f"({' '.join(f'{k}={v}' for k, v in job['overrides'].items())}):", ""]
        for events_dir in sorted({p.parent for p in job_dir.rglob("events.out.tfevents*")}):
            events = EventAccumulator(str(events_dir), size_guidance={"images": 0})
            events.Reload()
            for tag in sorted(events.Tags().get("images", [])):
                if not tag.endswith(("expert_class", "expert_token_category")):
                    continue
                image = events.Images(tag)[-1]
                target = context.figures / f"{context.study.name}_{sweep}_{tag.replace('/', '_')}.png"
                target.write_bytes(image.encoded_image_string)
                lines += [f"{sweep}, `{tag}` at step {image.step}:", "", f"![{tag}](results/{target.name})", ""]
    return lines


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
        header = [*groups[0].varying, "n", *study.metrics]
        lines += [f"`{sweep}`:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in groups:
            cells = [group.overrides.get(k, "") for k in group.varying] + [str(len(group.jobs))]
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


def context_seeds(context: Context) -> str:
    seeds = sorted({j["overrides"].get("seed", "0") for f in context.folders.values() for j in collect_jobs(f)}, key=int)
    return ", ".join(seeds)


STUDIES = [
    Study(
        "moe_vs_dense", "MoE vs the dense twin at equal active FLOPs (LM)",
        "At equal compute per token, a sparse MoE reaches a lower loss than its dense twin "
        "(Shazeer et al. 2017; Fedus et al. 2021, Switch, Fig. 1).",
        [Sweep("lm", LM, {"model.moe_every": ["0", "2"]}, language=True)],
        ["val/bpb", "test/bpb"],
        extra=both(verdict_moe_vs_dense, lambda c: copy_figure(c, "lm", "curve_val_bpb.png", "validation bits per byte")),
    ),
    Study(
        "expert_scaling", "More experts at fixed active FLOPs (LM)",
        "With active compute fixed, loss falls as the number of experts grows, with diminishing "
        "returns (Fedus et al. 2021, Fig. 4; Clark et al. 2022).",
        [Sweep("dense", [*LM, "model.moe_every=0"], language=True),
         Sweep("experts", LM, {"experts": ["4", "8", "16", "32"]}, language=True)],
        ["val/bpb", "test/bpb"], seeds=1, extra=verdict_expert_scaling,
    ),
    Study(
        "balance_loss", "The load-balancing loss (ViT)",
        "The auxiliary balance loss evens out expert load at little cost in quality; without it "
        "routing is imbalanced or collapses (Fedus et al. 2021, sec. 2.2).",
        [Sweep("weight", ["loss=balance"], {"loss.balance": ["0", "0.001", "0.01", "0.1"]})],
        ["val/acc", "test/acc"],
        extra=both(lambda c: ["Final load per layer (mean over MoE layers of the last logged value):", "",
                              *routing_table(c, {"load_max_over_mean": "load max/mean", "load_cv": "load CV"}),
                              *copy_figure(c, "weight", "routing_load_max_over_mean.png", "load max/mean per layer")],
                   verdict_balance),
    ),
    Study(
        "zloss", "The router z-loss (ViT)",
        "The z-loss keeps router logits small without hurting quality (Zoph et al. 2022, ST-MoE, sec. 3.3).",
        [Sweep("weight", ["loss=balance_zloss"], {"loss.zloss": ["0", "0.001", "0.01"]})],
        ["val/acc", "test/acc"],
        extra=both(lambda c: ["Final router z = mean (logsumexp h)² (mean over MoE layers):", "",
                              *routing_table(c, {"router_z": "router z", "router_entropy": "router entropy"})],
                   verdict_zloss),
    ),
    Study(
        "capacity", "Capacity factor of Switch top-1 (ViT)",
        "Raising the training capacity factor drops fewer tokens and improves quality, with "
        "diminishing returns (Fedus et al. 2021, Table 1).",
        [Sweep("factor", ["router=switch"], {"router.capacity_factor": ["0.5", "1.0", "1.25", "2.0", "null"]})],
        ["val/acc", "test/acc"],
        extra=both(lambda c: ["Final share of assignments dropped in training (mean over MoE layers):", "",
                              *routing_table(c, {"dropped_fraction": "dropped fraction"})],
                   verdict_capacity),
    ),
    Study(
        "routers_vit", "Every router on the ViT",
        "Each router trains; the papers report Soft MoE, expert choice and balanced routers at or "
        "above top-k (Puigcerver et al. 2023; Zhou et al. 2022).",
        [Sweep("routers", [], {"router": ROUTERS}), Sweep("dense_twin", ["model.moe_every=0"])],
        ["val/acc", "test/acc", "val/loss"], extra=verdict_routers,
    ),
    Study(
        "routers_hard", "Routers on a harder vision task (corrupted digits)",
        "Where the task leaves headroom, expert choice and Soft MoE match or beat top-k, and every MoE "
        "beats its dense twin (Zhou et al. 2022; Puigcerver et al. 2023). The clean digits put most "
        "routers within noise of each other (above), so this repeats the main routers on "
        "`experiment=vit_digits_hard`: a 3×3 square blanked and noise of std 0.3 in every image, four "
        "corrupted copies per digit, 1,080 val and test images, 8 epochs × 79 steps. It needs no download "
        "and costs what the clean runs cost, so it fits the same budget.",
        [Sweep("routers", ["experiment=vit_digits_hard"], {"router": ["topk", "expert_choice", "soft", "hash"]}),
         Sweep("dense_twin", ["experiment=vit_digits_hard", "model.moe_every=0"])],
        ["val/acc", "test/acc", "val/loss"],
        extra=partial(verdict_routers, against_topk=("expert_choice", "soft", "hash")),
    ),
    Study(
        "noisy_topk", "Why noisy top-k trails (ViT)",
        "Noisy top-k with its own importance and load losses trains as well as top-k (Shazeer et al. 2017).",
        [Sweep("losses", ["router=noisy_topk"], {"loss": ["balance_zloss", "importance_load", "none"]}),
         Sweep("topk", ["router=topk"], {"loss": ["balance_zloss"]})],
        ["val/acc", "test/acc", "val/loss"], extra=verdict_noisy,
    ),
    Study(
        "soft_moe_tokens", "Soft MoE with more tokens per image (ViT, patch size 1)",
        "Soft MoE beats token-choice routers when a sequence has many tokens per slot "
        "(Puigcerver et al. 2023); the default ViT has only 16 patches.",
        [Sweep("soft", [*PATCH1, "router=soft"], {"router.slots_per_expert": ["1", "8"]}),
         Sweep("topk", [*PATCH1, "router=topk"]),
         Sweep("dense", [*PATCH1, "model.moe_every=0"])],
        ["val/acc", "test/acc", "val/loss"], seeds=2, extra=verdict_soft,
    ),
    Study(
        "upcycling", "Sparse upcycling of the dense LM",
        "An MoE whose experts start as copies of a trained dense model's FFN (sparse upcycling) beats "
        "both the dense model trained on and the same MoE trained from scratch, for the same number of "
        "steps (Komatsuzaki et al. 2023). Here: the dense LM for 200 steps, then upcycled into top-2 "
        "experts as wide as its FFN (`model.expert_hidden=dense`: twice the dense FFN's FLOPs, as in the "
        "paper) for 100 more (a fresh optimizer, 10 warm-up steps, cosine), against the dense LM and that "
        "MoE trained 300 steps from scratch.",
        [Sweep("dense_200", [*LM_EPOCHS(2), "model.moe_every=0"], language=True),
         Sweep("upcycled", [*LM_EPOCHS(1), *COPIES, "model.upcycle=true", "task.warmup_steps=10",
                            "init_from={out}/upcycling/dense_200/${seed}/checkpoints/last.ckpt"], language=True),
         Sweep("moe_scratch", [*LM, *COPIES], language=True),
         Sweep("dense_300", LM, language=True, source="moe_vs_dense/lm", pick={"model.moe_every": "0"})],
        ["val/bpb", "test/bpb"], seeds=2, extra=verdict_upcycling, default=False,
    ),
    Study(
        "specialisation", "What experts specialise in",
        "Experts specialise: by token type in language models and by class in vision (Shazeer et al. "
        "2017; Riquelme et al. 2021, V-MoE; Jiang et al. 2024, Mixtral sec. 5).",
        [Sweep("vit", [], source="routers_vit/routers", pick={"router": "topk", "seed": "0"}),
         Sweep("lm", LM, language=True, source="moe_vs_dense/lm", pick={"model.moe_every": "2", "seed": "0"})],
        [], seeds=1, extra=specialisation_images,
    ),
]


ROUTERS_TABLE = ("<!-- routers table: written by scripts/reproduce.py from the routers_vit study -->",
                 "<!-- end of routers table -->")


def routers_table(folder: Path, twin_folder: Path) -> list[str]:
    """One row per router (mean ± std over seeds) and the dense twin's row, best val/acc first."""
    metrics = ["val/acc", "test/acc", "val/loss"]
    rows = []
    for group in group_jobs(collect_jobs(folder)):
        rows.append((f"`{group.overrides.get('router', '?')}`", group.jobs))
    rows.sort(key=lambda row: -(spread([j["metrics"].get("val/acc") for j in row[1]]).mean or 0.0))
    twin = [j for g in group_jobs(collect_jobs(twin_folder)) for j in g.jobs] if twin_folder.is_dir() else []
    if twin:
        rows.append(("*dense twin* (`model.moe_every=0`)", twin))
    lines = ["| router | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, jobs in rows:
        lines.append(f"| {name} | {len(jobs)} | " + " | ".join(str(spread([j["metrics"].get(m) for j in jobs])) for m in metrics) + " |")
    return lines


def write_routers_table(out: Path, docs: Path) -> None:
    """Put the routers_vit study's table into routers.md between its markers (quick mode: a
    copy of routers.md under the quick docs folder)."""
    folder = out / "routers_vit" / "routers"
    source = ROOT / "docs" / "routers.md"
    if not folder.is_dir() or ROUTERS_TABLE[0] not in source.read_text():
        return
    text = source.read_text()
    head, rest = text.split(ROUTERS_TABLE[0], 1)
    _, tail = rest.split(ROUTERS_TABLE[1], 1)
    seeds = sorted({j["overrides"].get("seed", "0") for j in collect_jobs(folder)}, key=int)
    table = "\n".join([ROUTERS_TABLE[0], "", f"Seeds {', '.join(seeds)}; mean ± sample std (n runs); best val/acc first.", "",
                       *routers_table(folder, out / "routers_vit" / "dense_twin"), "", ROUTERS_TABLE[1]])
    (docs / "routers.md").write_text(head + table + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", nargs="*", choices=[s.name for s in STUDIES], help="studies to run (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds per setting (default: each study's own, 3 for most)")
    parser.add_argument("--quick", action="store_true", help="tiny runs and grids, written outside docs/")
    parser.add_argument("--rerun", action="store_true", help="run studies whose sweep folders already exist")
    parser.add_argument("--out", type=Path, help="folder for the sweeps (default: outputs/reproduce[_quick])")
    args = parser.parse_args()
    out = args.out or ROOT / "outputs" / ("reproduce_quick" if args.quick else "reproduce")
    docs = out / "docs" if args.quick else ROOT / "docs"
    figures = docs / "results"
    if args.quick and out.exists():
        shutil.rmtree(out)
    figures.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STUDIES if (s.name in args.study if args.study else s.default or args.quick)]
    sections_file = out / "sections.json"
    sections = json.loads(sections_file.read_text()) if sections_file.exists() else {}
    timings_file = out / "timings.json"  # "<study>/<sweep>" → wall minutes of its multirun
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for study in chosen:
        seeds = 1 if args.quick else (args.seeds or study.seeds)
        print(f"{study.name} ({seeds} seed{'s' * (seeds > 1)}):", flush=True)
        folders, commands = {}, []
        for sweep in study.sweeps:
            if sweep.source is not None:  # another study's runs
                folders[sweep.name] = out / sweep.source
                if not folders[sweep.name].is_dir():
                    raise SystemExit(f"moelab: error: {study.name} reads {sweep.source}: run its study first")
                continue
            folder = out / study.name / sweep.name
            if args.rerun and folder.exists():
                shutil.rmtree(folder)
            if folder.exists():
                print(f"  {sweep.name}: kept from an earlier run ({folder})", flush=True)
                write_report(folder)  # jobs may have been resumed or rerun since
                commands.append(" ".join(["python train.py", *sweep.arguments(seeds, args.quick, shown_path(out))]))
            else:
                commands.append(run_sweep(sweep, folder, seeds, args.quick, timings))
                timings_file.write_text(json.dumps(timings, indent=1))
            folders[sweep.name] = folder
        steps = ("Quick mode: 3 training steps per run." if args.quick else
                 "LM runs: 300 steps of 32 × 128 bytes; ViT runs: the default 30 epochs × 20 steps "
                 "(vit_digits_hard: 8 epochs × 79 steps).")
        context = Context(study, folders, figures, args.quick)
        own = [f"{study.name}/{s.name}" for s in study.sweeps if s.source is None]
        minutes = sum(timings[k] for k in own) if own and all(k in timings for k in own) else None
        sections[study.name] = study_section(study, context, commands, steps, minutes)
        sections_file.write_text(json.dumps(sections, indent=1))
    page = [
        "# Results: the MoE literature's findings, re-measured on the bundled data",
        "",
        "Every number below comes from `python scripts/reproduce.py` (2 CPU cores); each table is mean ± "
        "sample std over seeds (n runs). Studies not yet run say so. `python scripts/reproduce.py` runs "
        "the default set: every study but " + ", ".join(f"`{s.name}`" for s in STUDIES if not s.default) + ", which "
        "`--study <name>` runs.",
        "",
    ]
    recorded = [k for k in timings if k.split("/")[0] in {s.name for s in STUDIES}]
    if recorded:
        page += [f"The sweeps' wall times add up to {sum(timings[k] for k in recorded):.0f} minutes "
                 f"({len(recorded)} sweeps recorded in `outputs/reproduce/{timings_file.name}`).", ""]
    for study in STUDIES:
        outside = "" if study.default else " (outside the default set)"
        page.append(sections.get(study.name, f"## {study.title}\n\nNot run yet{outside}: "
                                             f"`python scripts/reproduce.py --study {study.name}`.\n"))
        page.append("")
    (docs / "results.md").write_text("\n".join(page))
    write_routers_table(out, docs)
    print(f"wrote {docs / 'results.md'}")


if __name__ == "__main__":
    main()
