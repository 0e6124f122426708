"""Which blocks of a model get a MoE feed-forward layer, and how wide its experts are."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from moelab.moe.errors import ConfigError


def moe_layer_indices(depth: int, moe_every: int = 2, moe_layers: Sequence[int] | None = None,
                      moe_last: int | None = None) -> list[int]:
    """Block indices that hold a MoE layer.

    `moe_layers` (explicit, negative indices count from the end) wins over `moe_every`.
    `moe_every=n` puts a MoE layer in every n-th block, ending at the last block
    (n=2: blocks 1, 3, 5, … as in GShard and Switch); `moe_every=0` makes a dense model.
    `moe_last=n` keeps only the last n of those blocks (V-MoE's "Last-n", Riquelme et al.
    2021: depth 12, every 2, last 2 → blocks 9 and 11).

    A model without blocks is refused, and so is an MoE model whose settings leave it
    without a MoE layer: the dense twin says so with `moe_every=0` or `moe_layers=[]`.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"model.depth={depth!r} builds no blocks: give it a whole number >= 1")
    if moe_last is not None:
        if isinstance(moe_last, bool) or not isinstance(moe_last, int) or moe_last < 1:
            raise ConfigError(f"model.moe_last={moe_last!r} must be a whole number >= 1 (null: every chosen block)")
        chosen = moe_layer_indices(depth, moe_every, moe_layers)
        if moe_last > len(chosen):
            raise ConfigError(f"model.moe_last={moe_last}, but only {len(chosen)} block(s) are MoE blocks "
                              f"(depth {depth}, moe_every={moe_every}): lower it or set model.moe_every=1")
        return chosen[-moe_last:]
    if moe_layers is not None:
        indices = []
        for i in moe_layers:
            if not -depth <= i < depth:
                raise ConfigError(
                    f"model.moe_layers has {i}, outside a model of depth {depth}: use indices in [0, {depth - 1}]"
                )
            indices.append(i % depth)
        return sorted(set(indices))
    if moe_every < 0:
        raise ConfigError(f"model.moe_every={moe_every} must be >= 0 (0 = dense model)")
    if moe_every == 0:
        return []
    chosen = [i for i in range(depth) if (i + 1) % moe_every == 0]
    if not chosen:
        nth = {2: "2nd", 3: "3rd"}.get(moe_every, f"{moe_every}th")
        raise ConfigError(f"model.moe_every={moe_every} puts a MoE layer in every {nth} block, and a model of "
                          f"depth {depth} has none: lower model.moe_every, or set it to 0 for the dense twin")
    return chosen


def is_dense_twin(model_config: Mapping[str, Any]) -> bool:
    """Whether a model config asks for no MoE layer: `moe_every=0` or `moe_layers=[]`."""
    layers = model_config.get("moe_layers")
    return (layers is not None and len(layers) == 0) or (layers is None and model_config.get("moe_every") == 0)


EXPERT_WIDTHS = ("match", "dense")


def expert_width(expert_hidden: int | str, dense_hidden: int) -> tuple[int, bool]:
    """(hidden, match_dense_flops) for MoELayer from a model's `expert_hidden` setting.

    "match": experts sized so a token's active expert units equal the dense FFN's width
    (equal active FLOPs with the dense twin, whatever the router's k). "dense": each expert
    as wide as the dense FFN (V-MoE, Switch: top-k costs k dense FFNs). An integer: that
    width per expert.
    """
    if expert_hidden == "match":
        return dense_hidden, True
    if expert_hidden == "dense":
        return dense_hidden, False
    if isinstance(expert_hidden, bool) or not isinstance(expert_hidden, int) or expert_hidden < 8:
        raise ConfigError(
            f"model.expert_hidden={expert_hidden!r}: use match (equal active FLOPs with the dense model), "
            "dense (each expert as wide as the dense FFN) or a width >= 8"
        )
    return expert_hidden, False
