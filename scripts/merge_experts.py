"""Merge a trained MoE's experts into fewer and measure what it costs.

    python scripts/merge_experts.py outputs/runs/<run>/checkpoints/last.ckpt --to 4 2 --method mc-smoe neighbour-usage
    python scripts/merge_experts.py <ckpt> --to 4 --method mc-smoe --out merged/   # also write the checkpoints

Every MoE layer's experts are merged into `--to` experts per layer (moelab.moe.lifecycle.merge).
`mc-smoe` (the default; Li et al. 2023): the most used experts on a calibration split
(`--split`, default val) lead the groups, the others join the leader with the most similar
router logits, the router is kept and each member runs its group's usage-weighted merged
weights. The averages (`neighbour-usage`, `neighbour-mean`, `weight-similarity`) average
weight stacks and router rows within groups, so routing changes. Prints one table:
validation loss (and accuracy or bits per byte) of the original model and of each
(method, E') merge, evaluated with the run's own task on `--split`. With `--out`, each
merged model is saved as `merged_<method>_E<E'>.ckpt`: the run's config with experts=E'
(an `mc-smoe` merge keeps the E slots of the kept router, each holding its group's weights),
loadable as `init_from=` (fine-tuning the merged model) or `teacher=`. A sharded checkpoint
folder (written under `trainer=fsdp`/`fsdp_ep`) is read in this process, and the merged
checkpoints are written as sharded folders too (`merged_<method>_E<E'>/`, the layout those
trainers write), so `init_from=` under `trainer=fsdp_ep` reads them like any run's.
`--to 1` merges each layer into one dense FFN (saved as a one-expert layer with
router=dense: every token, weight 1). An average to 1 < E' < k is refused: the router needs k
(`mc-smoe` keeps the router, so any E' works).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf, open_dict

from moelab.models.build import build_model
from moelab.moe.errors import ConfigError
from moelab.moe.lifecycle.merge import METHODS, expert_groups, merged_layer_state
from moelab.moe.routed import moe_layers
from moelab.tasks.checkpoint_io import model_from_state, read_model_state, save_model_state


class Usage(Callback):
    """Tokens each expert of each MoE layer processed over the evaluated batches, and the
    router logits of up to `max_tokens` of them per layer (MC-SMoE's similarity)."""

    def __init__(self, max_tokens: int = 1 << 16) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.max_tokens = max_tokens

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for i, layer in enumerate(moe_layers(pl_module.model)):
            counts = layer.last_plan.tokens_per_expert_E.detach().double().cpu()
            self.counts[i] = self.counts.get(i, 0) + counts
            kept = self.logits.setdefault(i, [])
            room = self.max_tokens - sum(t.shape[0] for t in kept)
            if room > 0:
                kept.append(layer.last_plan.router_logits_TE[:room].detach().float().cpu())

    on_test_batch_end = on_validation_batch_end

    def logits_TE(self, i: int) -> torch.Tensor:
        return torch.cat(self.logits[i])


def evaluate(cfg, model, split: str, usage: Usage | None = None) -> dict[str, float]:
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, _convert_="all")
    task = instantiate(cfg.task, model=model, _convert_="all")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[usage] if usage else [])
    run = trainer.validate if split == "val" else trainer.test
    return {k: float(v) for k, v in run(task, datamodule=datamodule, verbose=False)[0].items()}


def config_with_experts(cfg, experts: int, width: int):
    """The run's config with `experts` per layer of the given width; one expert is a dense
    FFN (every token, weight 1: router=dense)."""
    new = copy.deepcopy(cfg)
    with open_dict(new):
        new.experts = experts
        new.expert.num_experts = experts
        new.model.expert_hidden = width  # the merged experts keep their width whatever the router
        if experts == 1 and cfg.experts != 1:
            new.router = {"_target_": "moelab.moe.routers.DenseRouter", "_partial_": True}
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by train.py (a file, or a sharded folder)")
    parser.add_argument("--to", type=int, nargs="+", required=True, help="experts per layer after merging")
    parser.add_argument("--method", nargs="+", default=["mc-smoe"], choices=METHODS,
                        help="mc-smoe: MC-SMoE's grouping, router kept; the others: averages (see the module docstring)")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="calibration and evaluation split")
    parser.add_argument("--out", type=Path, help="write each merged checkpoint into this folder")
    # The checkpoint as the first word, or as ckpt_path= as eval.py, predict.py and generate.py also take it.
    args = parser.parse_args([a.removeprefix("ckpt_path=") for a in sys.argv[1:]])
    try:
        # One weights_only load, with the same one-line errors as init_from and teacher.
        weights, config = read_model_state(args.checkpoint, key="checkpoint")
        model = model_from_state(weights, config, "checkpoint", args.checkpoint)  # its stored targets checked
        cfg = OmegaConf.create(config)
        sharded = Path(args.checkpoint).is_dir()
        usage = Usage()
        base = evaluate(cfg, model, args.split, usage)
        layers = moe_layers(model)
        names = {id(m): n for n, m in model.named_modules()}
        rows = [("original", layers[0].num_experts, base)]
        written: list[str] = []
        k = getattr(layers[0].router, "k", None)
        for method in args.method:
            for target in args.to:
                if method != "mc-smoe" and k is not None and 1 < target < k:
                    raise ConfigError(f"--to {target} is fewer experts than the router's k={k} (--to 1 makes a dense FFN)")
                bind = method == "mc-smoe"  # the router kept: E slots bound to E' merged experts
                state = dict(model.state_dict())
                for i, layer in enumerate(layers):
                    groups = expert_groups(layer, target, method, usage.counts[i], usage.logits_TE(i))
                    weights_E = usage.counts[i] if method != "neighbour-mean" else torch.ones(layer.num_experts)
                    prefix = names[id(layer)]
                    for key in [k_ for k_ in state if k_.startswith(prefix + ".")]:
                        del state[key]
                    merged_state = merged_layer_state(layer, groups, weights_E, bind=bind)
                    state.update({f"{prefix}.{key}": v for key, v in merged_state.items()})
                slots = layers[0].num_experts if bind else target
                new_cfg = config_with_experts(cfg, slots, layers[0].experts.hidden * layers[0].experts.granularity)
                merged = build_model(new_cfg)
                merged.load_state_dict(state)
                rows.append((method, target, evaluate(new_cfg, merged, args.split)))
                if args.out is not None:
                    args.out.mkdir(parents=True, exist_ok=True)
                    name = f"merged_{method}_E{target}" + ("" if sharded else ".ckpt")
                    path = save_model_state(args.out / name, merged.state_dict(),
                                            OmegaConf.to_container(new_cfg, resolve=True), sharded)
                    router = " router=dense" if slots == 1 else ""
                    written.append(f"{path}: train on with the run's overrides plus init_from={path} "
                                   f"experts={slots} model.expert_hidden={new_cfg.model.expert_hidden}{router}")
    except ConfigError as error:
        raise SystemExit(f"moelab: error: {error}") from None
    metrics = [m for m in rows[0][2] if m.endswith(("/loss", "/acc", "/bpb"))]
    print(f"{args.checkpoint}: {len(layers)} MoE layers, {args.split} split")
    print("| method | experts per layer | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for method, experts, values in rows:
        print(f"| {method} | {experts} | " + " | ".join(f"{values.get(m, float('nan')):.4f}" for m in metrics) + " |")
    for line in written:
        print(line)


if __name__ == "__main__":
    sys.exit(main())
