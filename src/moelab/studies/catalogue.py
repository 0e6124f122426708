"""The studies of docs/results.md: each paper's claim, the sweeps that test it, and the verdict
that reads them. `python scripts/reproduce.py --study <name>` runs one."""

from __future__ import annotations

from functools import partial

from moelab.studies.study import ROOT, Study, Sweep, both, copy_figure, routing_table
from moelab.studies.verdicts import (
    specialisation_images,
    verdict_balance,
    verdict_capacity,
    verdict_expert_scaling,
    verdict_moe_vs_dense,
    verdict_noisy,
    verdict_routers,
    verdict_soft,
    verdict_upcycling,
    verdict_zloss,
)

ROUTERS = sorted(p.stem for p in (ROOT / "conf" / "router").glob("*.yaml"))
# Short LM schedule: 300 steps of 32 × 128 bytes (the experiment's own is 1000).
LM = ["experiment=lm_pystdlib", "data.train_steps_per_epoch=100", "trainer.max_epochs=3"]
LM_EPOCHS = lambda epochs: [*LM[:-1], f"trainer.max_epochs={epochs}"]  # noqa: E731 - 100 steps an epoch
# Upcycling's MoE: experts as wide as the dense FFN (copies), top-2: twice the dense FFN's FLOPs.
COPIES = ["model.expert_hidden=dense"]
# 8×8 digits as 64 patches of one pixel: four times the default ViT's 16 tokens per image.
PATCH1 = ["model.patch_size=1"]

STUDIES = [
    Study(
        "moe_vs_dense", "MoE vs the dense twin at equal active FLOPs (LM)",
        "At equal compute per token, a sparse MoE reaches a lower loss than its dense twin "
        "(Shazeer et al. 2017; Fedus et al. 2021, Switch, Fig. 1).",
        [Sweep("lm", LM, {"model.moe_every": ["0", "2"]}, language=True)],
        ["val/bpb", "test/bpb"], seeds=5,
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
        [Sweep("weight", ["loss=balance"], {"loss.balance": ["0", "0.01", "0.1"]})],
        ["val/acc", "test/acc"], seeds=5,
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
        [Sweep("factor", ["router=switch"], {"router.capacity_factor": ["0.5", "1.0", "1.25", "2.0"]}),
         # Dropless in training and at evaluation (Switch's evaluation factor is 2.0 otherwise).
         Sweep("dropless", ["router=switch", "router.capacity_factor=null", "router.eval_capacity_factor=null"])],
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
        ["val/acc", "test/acc", "val/loss"], seeds=5,
        extra=partial(verdict_routers, against_topk=("expert_choice", "soft", "hash")),
    ),
    Study(
        "noisy_topk", "Noisy top-k with its own losses (ViT)",
        "Noisy top-k with its own importance and load losses trains as well as top-k (Shazeer et al. 2017).",
        [Sweep("losses", ["router=noisy_topk"], {"loss": ["balance_zloss", "importance_load", "none"]}),
         Sweep("topk", ["router=topk"], {"loss": ["balance_zloss"]})],
        ["val/acc", "test/acc", "val/loss"], extra=verdict_noisy,
    ),
    Study(
        "soft_moe_tokens", "Soft MoE vs top-k at equal FLOPs, with more tokens per image (ViT, patch size 1)",
        "Soft MoE beats token-choice routers at equal compute when a sequence has many tokens "
        "(Puigcerver et al. 2023); the default ViT has only 16 patches. At 64 tokens per image and 8 "
        "experts as wide as the dense MLP, 8 slots per expert (64 slots) run the experts on as many "
        "slots as there are tokens: the dense MLP's FLOPs in the experts, as top-2 of half-width "
        "experts; Soft MoE's dispatch and combine come on top (the FLOP column counts them, and at "
        "this small width they are a third of an MLP). 1 slot per expert costs less than the MLP and "
        "is shown as the paper's cheaper setting, not at equal compute.",
        [Sweep("soft", [*PATCH1, "router=soft"], {"router.slots_per_expert": ["1", "8"]}),
         Sweep("topk", [*PATCH1, "router=topk"]),
         Sweep("dense", [*PATCH1, "model.moe_every=0"])],
        ["val/acc", "test/acc", "val/loss"], seeds=5, extra=verdict_soft,
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
