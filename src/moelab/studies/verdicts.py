"""What each study's runs say about its claim: the verdict paragraphs and figures of
docs/results.md, computed from the sweeps' final metrics and logged scalars."""

from __future__ import annotations

import statistics
from typing import Callable

from moelab.studies.study import ROOT, Comparisons, Context, curve, final_by_seed, fmt, job_scalars, values_by_group
from moelab.sweeps.jobs import collect_jobs


def verdict_moe_vs_dense(c: Context) -> list[str]:
    bpb = values_by_group(c, "lm", "val/bpb")
    moe, dense = bpb["2"], bpb["0"]
    tests = Comparisons()
    first = tests.add("MoE − dense", moe, dense)
    holds = "agrees with the claim" if tests.holds(first, -1) else "does not show the claim at this scale"
    return [f"**Measured.** val bpb MoE {fmt(moe)} vs dense {fmt(dense)}: {tests.text(first)}. This {holds}.", ""]


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
        tests = Comparisons()
        first = tests.add(quality, acc[better], acc[worse])
        at = ", ".join(f"{words} {fmt(values[setting])}" for setting, words in shown.items())
        return [f"**Measured.** {at}; {tests.text(first)}.", ""]

    return verdict


verdict_balance = verdict_statistic(
    "weight", "load_max_over_mean", {"0": "final load max/mean without the loss", "0.01": "at 0.01", "0.1": "at 0.1"},
    "0.01", "0", "val/acc at 0.01 minus at 0")
verdict_zloss = verdict_statistic(
    "weight", "router_z", {"0": "final router z without z-loss", "0.001": "at 0.001", "0.01": "at 0.01"},
    "0.001", "0", "val/acc at 0.001 minus at 0")
def verdict_capacity(c: Context) -> list[str]:
    """The dropped share by training capacity factor, and dropless (training and evaluation)
    against the smallest factor."""
    dropped = values_by_group(c, "factor", "final dropped_fraction")
    acc = values_by_group(c, "factor", "val/acc")
    dropless = values_by_group(c, "dropless", "val/acc")["all"]
    tests = Comparisons()
    first = tests.add("val/acc dropless − cf 0.5", dropless, acc["0.5"])
    at = ", ".join(f"cf {factor} {fmt(dropped[factor])}" for factor in sorted(dropped, key=float))
    return [f"**Measured.** Dropped fraction in training: {at}, dropless 0; {tests.text(first)}.", ""]


def verdict_routers(c: Context, against_topk: tuple[str, ...] = ("soft", "expert_choice", "noisy_topk")) -> list[str]:
    """Every router against the dense twin (the claim "every MoE beats its dense twin"), and
    the named ones against top-k: one family of comparisons, Holm-corrected."""
    acc = values_by_group(c, "routers", "val/acc")
    twin = values_by_group(c, "dense_twin", "val/acc")["all"]
    ranked = sorted(acc, key=lambda r: -statistics.fmean(acc[r]))
    tests = Comparisons()
    vs_twin = {router: tests.add(f"{router} − dense twin", acc[router], twin) for router in ranked}
    vs_topk = [tests.add(f"{router} − topk", acc[router], acc["topk"]) for router in against_topk if router in acc]
    beats = [r for r, i in vs_twin.items() if tests.holds(i, +1)]
    below = [r for r, i in vs_twin.items() if tests.difference(i) < 0]
    lines = ["**Measured.** Ranked by mean val/acc: " + ", ".join(f"{r} {statistics.fmean(acc[r]):.4f}" for r in ranked)
             + f"; dense twin {statistics.fmean(twin):.4f}.", "",
             *(f"- {tests.text(i)}" for i in [*vs_twin.values(), *vs_topk]), "",
             f"Against the dense twin, {len(beats)} of {len(ranked)} routers are higher at α = 0.05 after Holm's "
             f"correction ({', '.join(beats) or 'none'})"
             + (f"; the mean of {', '.join(below)} is below the twin's, which contradicts \"every MoE beats its "
                f"dense twin\" here" if below else "") + "."]
    return [*lines, ""]


def verdict_noisy(c: Context) -> list[str]:
    acc = values_by_group(c, "losses", "val/acc")
    topk = values_by_group(c, "topk", "val/acc")["all"]
    tests = Comparisons()
    indices = {loss: tests.add(f"noisy_topk with loss={loss} − topk", values, topk) for loss, values in acc.items()}
    parts = [f"with loss={loss}: {fmt(acc[loss])}" for loss in acc]
    return ["**Measured.** noisy_topk " + "; ".join(parts) + f". topk: {fmt(topk)}.", "",
            *(f"- {tests.text(i)}" for i in indices.values()), ""]


def verdict_soft(c: Context) -> list[str]:
    soft = values_by_group(c, "soft", "val/acc")
    topk = values_by_group(c, "topk", "val/acc")["all"]
    dense = values_by_group(c, "dense", "val/acc")["all"]
    tests = Comparisons()
    indices = [tests.add(f"soft, {p} slot(s) per expert − topk", v, topk) for p, v in soft.items()]
    parts = [f"soft, {p} slot(s) per expert: {fmt(v)}" for p, v in soft.items()]
    equal = indices[list(soft).index("8")] if "8" in soft else None
    held = ("" if equal is None else
            f"With the experts at equal FLOPs (8 slots per expert; its FLOP column adds Soft MoE's dispatch "
            f"and combine) the claim {'holds' if tests.holds(equal, +1) else 'does not hold'} here.")
    return ["**Measured** at 64 tokens per image: " + "; ".join(parts) + f"; topk {fmt(topk)}; dense twin {fmt(dense)}.",
            "", *(f"- {tests.text(i)}" for i in indices), "", held, ""]


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
    tests = Comparisons()
    indices = [tests.add(f"upcycled − {name}", upcycled, other) for name, other in (("dense", dense), ("MoE from scratch", scratch))]
    return [f"**Measured.** final val bpb, upcycled after {offset} dense steps: {fmt(upcycled)}; dense all along "
            f"{fmt(dense)}; MoE from scratch {fmt(scratch)}.", "", *(f"- {tests.text(i)}" for i in indices), "",
            f"![val bpb of the three ways](results/{target.name})", ""]


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
