"""Run the reproduction studies and write docs/results.md (and routers.md's table) from them:
what `python scripts/reproduce.py` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moelab.studies.catalogue import STUDIES
from moelab.studies.study import ROOT, Context, flops_cell, run_sweep, shown_path, study_section
from moelab.sweeps.jobs import collect_jobs
from moelab.sweeps.report import group_jobs, spread, write_report


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
    lines = ["| router | n | FFN FLOPs / dense | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
    for name, jobs in rows:
        flops = flops_cell(Path(jobs[0]["dir"])) if "dir" in jobs[0] else "—"
        lines.append(f"| {name} | {len(jobs)} | {flops} | "
                     + " | ".join(str(spread([j["metrics"].get(m) for j in jobs])) for m in metrics) + " |")
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


def reproduce(names: list[str] | None = None, seeds: int | None = None, quick: bool = False, rerun: bool = False,
              out: Path | None = None) -> Path:
    """Run the studies `names` (default: the default set; all of them with `quick`), each with
    `seeds` seeds (default: its own), into `out`, and write the results page; returns its path.
    `quick`: tiny runs and grids, the page written under `out` instead of docs/. Sweeps whose
    folders exist are kept unless `rerun`."""
    out = out or ROOT / "outputs" / ("reproduce_quick" if quick else "reproduce")
    docs = out / "docs" if quick else ROOT / "docs"
    figures = docs / "results"
    if quick and out.exists():
        shutil.rmtree(out)
    figures.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STUDIES if (s.name in names if names else s.default or quick)]
    sections_file = out / "sections.json"
    sections = json.loads(sections_file.read_text()) if sections_file.exists() else {}
    timings_file = out / "timings.json"  # "<study>/<sweep>" → wall minutes of its multirun
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for study in chosen:
        study_seeds = 1 if quick else (seeds or study.seeds)
        print(f"{study.name} ({study_seeds} seed{'s' * (study_seeds > 1)}):", flush=True)
        folders, commands = {}, []
        for sweep in study.sweeps:
            if sweep.source is not None:  # another study's runs
                folders[sweep.name] = out / sweep.source
                if not folders[sweep.name].is_dir():
                    raise SystemExit(f"moelab: error: {study.name} reads {sweep.source}: run its study first")
                continue
            folder = out / study.name / sweep.name
            if rerun and folder.exists():
                shutil.rmtree(folder)
            if folder.exists():
                print(f"  {sweep.name}: kept from an earlier run ({folder})", flush=True)
                write_report(folder)  # jobs may have been resumed or rerun since
                commands.append(" ".join(["python train.py", *sweep.arguments(study_seeds, quick, shown_path(out))]))
            else:
                commands.append(run_sweep(sweep, folder, study_seeds, quick, timings))
                timings_file.write_text(json.dumps(timings, indent=1))
            folders[sweep.name] = folder
        steps = ("Quick mode: 3 training steps per run." if quick else
                 "LM runs: 300 steps of 32 × 128 bytes; ViT runs: the default 30 epochs × 20 steps "
                 "(vit_digits_hard: 8 epochs × 79 steps).")
        context = Context(study, folders, figures, quick)
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
    return docs / "results.md"
