"""The MoE lifecycle end to end on the bundled LM data, written up as docs/lifecycle.md (what
`python scripts/lifecycle.py` runs): sparse upcycling, distillation, merging, LoRA-MoE and
MaskMoE, fine-tuning recipes. One seed, 300 steps of the byte-level LM per run."""

from __future__ import annotations

import re
import shutil

from moelab.studies.lab import Lab, bpb, datamodule_of, fmt, load, parameters, token_losses
from moelab.studies.study import ROOT


def upcycling(lab: Lab) -> list[str]:
    from moelab.run.checkpoints import start_from_weights
    from moelab.models.build import build_model
    from omegaconf import OmegaConf

    dense = lab.train("dense", 3, "model.moe_every=0")
    lab.train("dense_200", 2, "model.moe_every=0")
    upcycled = lab.train("upcycled", 1, "model.expert_hidden=dense", "model.upcycle=true", "task.warmup_steps=10",
                         f"init_from={lab.ckpt('dense_200')}")
    scratch = lab.train("moe_copies", 3, "model.expert_hidden=dense")
    # The paper's baseline: the same dense checkpoint trained on as dense, with the same restart.
    continued = lab.train("dense_continued", 1, "model.moe_every=0", "task.warmup_steps=10",
                          f"init_from={lab.ckpt('dense_200')}")
    # The dense run ended at the bottom of its cosine (3e-4); restarting at the peak 3e-3 undoes part of it.
    gentle = lab.train("upcycled_lr1e-3", 1, "model.expert_hidden=dense", "model.upcycle=true", "task.warmup_steps=10",
                       "task.lr=1e-3", f"init_from={lab.ckpt('dense_200')}")
    # Step 0: the upcycled model before any update against the dense model it came from.
    data = datamodule_of(lab.folder("dense_200"))
    dense_model = load(lab.ckpt("dense_200"))
    model = build_model(OmegaConf.load(lab.folder("upcycled") / ".hydra" / "config.yaml"))
    start_from_weights(model, str(lab.ckpt("dense_200")), upcycle=True)
    dense_loss = token_losses(dense_model, data)[0].mean().item()
    upcycled_loss = token_losses(model.eval(), data)[0].mean().item()
    rows = [("dense, 300 steps", dense, "dense"), ("dense 200 steps, then dense for 100 more (peak lr 3e-3)", continued,
            "dense_continued"), ("MoE (top-2 of 8 dense-width experts) from scratch, 300 steps", scratch,
            "moe_copies"), ("dense 200 steps, then upcycled for 100 (peak lr 3e-3)", upcycled, "upcycled"),
            ("dense 200 steps, then upcycled for 100 (peak lr 1e-3)", gentle, "upcycled_lr1e-3")]
    return [
        "## Sparse upcycling",
        "",
        "Komatsuzaki et al. (2023): an MoE whose experts start as copies of a trained dense FFN beats both "
        "the dense model trained on and the MoE trained from scratch, at equal steps. The MoE has experts as "
        "wide as the dense FFN (`model.expert_hidden=dense`, top-2: twice the dense FFN's FLOPs, as in the paper); "
        "the upcycled run gets a fresh optimizer with 10 warm-up steps.",
        "",
        "```bash",
        lab.commands["dense_200"],
        lab.commands["upcycled"],
        lab.commands["upcycled_lr1e-3"],
        lab.commands["dense_continued"],
        lab.commands["dense"],
        lab.commands["moe_copies"],
        "```",
        "",
        f"At step 0, before any update, the upcycled model computes the dense model: val loss over all "
        f"{len(data.tokens['val']) - 1:,} val positions {upcycled_loss:.6f} against the dense model's "
        f"{dense_loss:.6f} (difference {upcycled_loss - dense_loss:+.1e}; top-2 weights renormalised, so exact whatever the "
        f"router's start, here N(0, 0.02²)).",
        "",
        "| run | val bpb | test bpb | wall min |",
        "|---|---|---|---|",
        *(f"| {label} | {fmt(m.get('val/bpb'))} | {fmt(m.get('test/bpb'))} | "
          f"{fmt(lab.minutes.get(name, 0) + (lab.minutes.get('dense_200', 0) if name.startswith(('upcycled', 'dense_continued')) else 0), 1)} |"
          for label, m, name in rows),
        "",
        f"**Measured.** Against the paper's baseline, the same dense checkpoint trained on as dense with the same "
        f"restart: upcycled − dense continued {upcycled['val/bpb'] - continued['val/bpb']:+.4f} bpb (val), "
        f"{upcycled['test/bpb'] - continued['test/bpb']:+.4f} (test). "
        f"Against runs of 300 steps from scratch: upcycled − dense {upcycled['val/bpb'] - dense['val/bpb']:+.4f} bpb at peak lr 3e-3 and "
        f"{gentle['val/bpb'] - dense['val/bpb']:+.4f} at 1e-3; upcycled − MoE from scratch "
        f"{upcycled['val/bpb'] - scratch['val/bpb']:+.4f} and {gentle['val/bpb'] - scratch['val/bpb']:+.4f} bpb (one "
        "seed; the seed spread of these runs is about 0.01 bpb, docs/results.md). The paper upcycles a dense model "
        "trained far longer than its extra budget; here the dense model has had 200 steps, its cosine schedule "
        "has ended at 3e-4, and the upcycled run starts a fresh optimizer: at this scale the 300-step runs, whose "
        "single schedule spans all their steps, are ahead.",
        "",
    ]


def distillation(lab: Lab) -> list[str]:
    dense = lab.train("dense", 3, "model.moe_every=0")
    teacher = lab.train("moe", 3)
    student = lab.train("distilled", 3, "model.moe_every=0", f"teacher={lab.ckpt('moe')}")
    switch = lab.train("distilled_switch", 3, "model.moe_every=0", f"teacher={lab.ckpt('moe')}",
                       "teacher_init_shared=true", "task.distill_weight=0.25", "task.distill_temperature=1")
    # The Switch student's control: the same start (the teacher's non-expert weights), CE only.
    shared_only = lab.train("init_shared", 3, "model.moe_every=0", f"teacher={lab.ckpt('moe')}",
                            "teacher_init_shared=true", "task.distill_weight=0")

    def share(split: str, student: dict) -> str:
        gain = dense[f"{split}/bpb"] - teacher[f"{split}/bpb"]
        kept = dense[f"{split}/bpb"] - student[f"{split}/bpb"]
        how = f"{kept / gain:.0%}" if gain > 0 else "— (the teacher is not better than dense)"
        return f"on {split} the MoE gains {gain:+.4f} bpb over dense and the student {kept:+.4f}: it keeps {how}"

    return [
        "## Distillation to a dense model",
        "",
        "Fedus et al. (2021, sec. 5): a dense student trained on (1 − w)·CE + w·T²·KL to a sparse teacher keeps "
        "part of the teacher's gain over dense (about 30 % in Switch). Teacher: the default MoE (8 experts, top-2, "
        "the same active FLOPs as dense); students: its dense twin with moelab's defaults, w = 0.5, T = 2 "
        "(`task.distill_weight`, `task.distill_temperature`) from a fresh init, and with Switch's recipe: every "
        "non-expert weight copied from the teacher (`teacher_init_shared=true`) and a 0.75 / 0.25 mix of the hard "
        "labels and the teacher (w = 0.25, T = 1). The Switch student starts with the teacher's attention and "
        "embeddings, trained for 300 steps already: its gain is not from distillation alone, so it is also "
        "compared with its control, the same start trained on the hard labels only (w = 0).",
        "",
        "```bash",
        lab.commands["moe"],
        lab.commands["distilled"],
        lab.commands["distilled_switch"],
        lab.commands["init_shared"],
        "```",
        "",
        "| model | val bpb | test bpb | wall min |",
        "|---|---|---|---|",
        f"| dense, CE only | {fmt(dense['val/bpb'])} | {fmt(dense.get('test/bpb'))} | {fmt(lab.minutes.get('dense'), 1)} |",
        f"| MoE teacher | {fmt(teacher['val/bpb'])} | {fmt(teacher.get('test/bpb'))} | {fmt(lab.minutes.get('moe'), 1)} |",
        f"| dense student (w 0.5, T 2, fresh init) | {fmt(student['val/bpb'])} | {fmt(student.get('test/bpb'))} | "
        f"{fmt(lab.minutes.get('distilled'), 1)} |",
        f"| dense student (Switch's recipe) | {fmt(switch['val/bpb'])} | {fmt(switch.get('test/bpb'))} | "
        f"{fmt(lab.minutes.get('distilled_switch'), 1)} |",
        f"| its control: the teacher's non-expert weights, CE only | {fmt(shared_only['val/bpb'])} | "
        f"{fmt(shared_only.get('test/bpb'))} | {fmt(lab.minutes.get('init_shared'), 1)} |",
        "",
        f"**Measured.** moelab's defaults: {share('val', student)}; {share('test', student)} of the gain. "
        f"Switch's recipe: {share('val', switch)}; {share('test', switch)}. Its control (the same start, CE "
        f"only) gains {dense['val/bpb'] - shared_only['val/bpb']:+.4f} bpb over dense on val by its start alone; "
        f"against it, the teacher's term moves bpb by {switch['val/bpb'] - shared_only['val/bpb']:+.4f} on val and "
        f"{switch.get('test/bpb', float('nan')) - shared_only.get('test/bpb', float('nan')):+.4f} on test (negative: "
        "the teacher helps). One seed, "
        "and the gains are about 2–3 seed spreads (0.01 bpb): the shares are rough numbers.",
        "",
    ]


def merging(lab: Lab) -> list[str]:
    lab.train("moe", 3)
    command, rows = lab.merge("moe")
    return [
        "## Merging experts",
        "",
        "Each MoE layer's experts merged into E' experts, no training after the merge. `mc-smoe` is MC-SMoE's "
        "merge (Li et al. 2023) without its neuron alignment: the E' most used experts on the val split lead the "
        "groups, every other expert joins the leader whose router logits over the val tokens are the most "
        "similar, each group's weights are averaged by usage, and the router is kept, every member bound to its "
        "group's merged weights. The others are plain averages that also average the router's rows (so routing "
        "changes; E' = 1 gives one dense FFN): `neighbour-usage` groups experts by index and weights them by "
        "their token share, `neighbour-mean` weights them equally, `weight-similarity` groups the experts with "
        "the most similar weights.",
        "",
        "```bash",
        command,
        "```",
        "",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def lora_and_maskmoe(lab: Lab) -> list[str]:
    moe = lab.train("moe", 3)
    lora = lab.train("lora", 3, "expert=lora")
    masked = lab.train("maskmoe", 3, "router.token_mask=frequency")
    data = datamodule_of(lab.folder("maskmoe"))
    mask_model, plain_model, lora_model = load(lab.ckpt("maskmoe")), load(lab.ckpt("moe")), load(lab.ckpt("lora"))
    router = next(m for m in mask_model.modules() if hasattr(m, "allowed_VE"))
    rare_V = router.allowed_VE.sum(-1) == 1
    table = []
    results = {}
    for name, model in (("top-k", plain_model), ("MaskMoE", mask_model)):
        losses, inputs, targets = token_losses(model, data)
        rare_in, rare_out = rare_V[inputs], rare_V[targets]
        results[name] = (losses.mean().item(), losses[rare_in].mean().item(), losses[rare_out].mean().item())
        table.append(f"| {name} | {bpb(results[name][0]):.4f} | {bpb(results[name][1]):.4f} (n={int(rare_in.sum())}) | "
                     f"{bpb(results[name][2]):.4f} (n={int(rare_out.sum())}) |")
    dense_params = parameters(load(lab.ckpt("dense")))
    return [
        "## LoRA-MoE experts",
        "",
        "`expert=lora`: one shared SwiGLU FFN per MoE layer, as wide as one expert (the dense FFN's 384 units / k = "
        "192 under the default equal-FLOPs width), plus, per expert, rank-8 adapters (scale α/r = 2) on its three "
        "matrices, computed by the same grouped matmuls. At init every expert is the base FFN. A token's two "
        "choices cost what the dense FFN costs, as for the plain MoE.",
        "",
        "```bash",
        lab.commands["lora"],
        "```",
        "",
        "| model | parameters | val bpb | test bpb | wall min |",
        "|---|---|---|---|---|",
        f"| dense twin | {dense_params:,} | {fmt(lab.train('dense', 3, 'model.moe_every=0')['val/bpb'])} | — | "
        f"{fmt(lab.minutes.get('dense'), 1)} |",
        f"| MoE, 8 SwiGLU experts top-2 | {parameters(plain_model):,} | {fmt(moe['val/bpb'])} | {fmt(moe.get('test/bpb'))} | "
        f"{fmt(lab.minutes.get('moe'), 1)} |",
        f"| LoRA-MoE, 8 experts top-2, rank 8 | {parameters(lora_model):,} | {fmt(lora['val/bpb'])} | "
        f"{fmt(lora.get('test/bpb'))} | {fmt(lab.minutes.get('lora'), 1)} |",
        "",
        "## MaskMoE",
        "",
        "Su et al. (2024): routing each rare token id to one fixed expert trains its representation "
        "consistently, where top-k spreads its few occurrences over many experts. `router.token_mask=frequency` "
        f"gives the rarer half of the byte values the training split shows, and the values it never shows "
        f"({int(rare_V.sum())} of 256 ids here), one expert each, and the other ids every expert. Loss on all val positions, on positions whose input byte is rare, and "
        "on positions whose next byte is rare:",
        "",
        "```bash",
        lab.commands["maskmoe"],
        "```",
        "",
        "| router | val bpb (all) | bpb, rare input | bpb, rare target |",
        "|---|---|---|---|",
        *table,
        "",
        f"Trained metrics: MaskMoE val bpb {fmt(masked['val/bpb'])}, top-k {fmt(moe['val/bpb'])} "
        "(the page's own full-split pass above covers every val window; the run logs the first 400).",
        "",
        f"**Measured.** MaskMoE − top-k on rare inputs {bpb(results['MaskMoE'][1] - results['top-k'][1]):+.4f} bpb, "
        f"on all positions {bpb(results['MaskMoE'][0] - results['top-k'][0]):+.4f} bpb (one seed).",
        "",
    ]


def fine_tuning(lab: Lab) -> list[str]:
    start = lab.train("moe", 3)
    source = f"init_from={lab.ckpt('moe')}"
    common = ["task.warmup_steps=10", "task.lr=1e-3", "task.aux_loss_scale=0.1"]
    runs = [("all weights", "ft_all", []), ("non-expert weights only", "ft_non_expert", ["task.freeze=[experts]"]),
            ("experts only", "ft_experts", ["task.freeze=[non_expert]"])]
    rows = []
    for label, name, extra in runs:
        metrics = lab.train(name, 1, source, *common, *extra)
        rows.append(f"| {label} | `{' '.join(extra) or '—'}` | {fmt(metrics['val/bpb'])} | "
                    f"{metrics['val/bpb'] - start['val/bpb']:+.4f} | {fmt(lab.minutes.get(name), 1)} |")
    return [
        "## Fine-tuning recipes",
        "",
        "100 more steps from the trained MoE (a fresh optimizer at lr 1e-3 with 10 warm-up steps, auxiliary "
        "losses scaled by 0.1), training everything, only the non-expert weights, or only the experts. Frozen "
        "parameters get no gradient and stay bit-identical (tested).",
        "",
        "```bash",
        *(lab.commands[name] for _, name, _ in runs),
        "```",
        "",
        f"| trained | freeze | val bpb | change from {fmt(start['val/bpb'])} | wall min |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def walk_through(quick: bool = False, rerun: bool = False):
    """Run every step (kept where its folder holds an ok record, unless `rerun`) and write the
    page: docs/lifecycle.md, or with `quick` (3 steps per run) under outputs/lifecycle_quick/.
    Returns the page's path."""
    out = ROOT / "outputs" / ("lifecycle_quick" if quick else "lifecycle")
    if rerun and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(out, quick)
    sections = []
    for part in (upcycling, distillation, merging, lora_and_maskmoe, fine_tuning):
        print(f"{part.__name__}:", flush=True)
        sections += part(lab)
    total = sum(lab.minutes.values())
    page = [
        "# The MoE lifecycle, measured",
        "",
        "Each method of the model's life after (and before) routing, run end to end on the bundled data: the "
        "byte-level LM on Python's stdlib (`experiment=lm_pystdlib`), 300 steps of 32 × 128 bytes unless said "
        "otherwise, one seed, 2 CPU cores. `python scripts/lifecycle.py` reruns everything and rewrites this page "
        f"({total:.0f} minutes of training here). The definitions are in [equations.md](equations.md); the "
        "seeded upcycling study is `python scripts/reproduce.py --study upcycling` "
        "([results.md](results.md)).",
        "",
        "Sharded checkpoints (folders written under `trainer=fsdp` or `fsdp_ep`) work wherever a checkpoint "
        "goes in: `init_from=` (with or without `model.upcycle=true`), `teacher=` and `merge_experts.py`, which "
        "writes a sharded run's merges as sharded folders. Under `trainer=fsdp_ep ep=2` upcycling, "
        "distillation, freezing and MaskMoE train as on one process; `expert=lora` refuses ep > 1 in one line "
        "(its shared base FFN would need its gradients reduced over the expert ranks too); use it with ep=1.",
        "",
        *sections,
    ]
    docs = out / "docs" if quick else ROOT / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    text = "\n".join(page)
    text = re.sub(r"\n{3,}", "\n\n", text)
    (docs / "lifecycle.md").write_text(text)
    print(f"wrote {docs / 'lifecycle.md'}")
    return docs / "lifecycle.md"
