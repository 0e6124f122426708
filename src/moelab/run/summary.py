"""Runs readable at a glance: the config as a compact tree when a run starts, one summary line
when it ends, and the settings that tell runs apart as TensorBoard hparams."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from moelab.models.placement import is_dense_twin

# The groups shown in the tree, in reading order, and the settings the HPARAMS dashboard compares.
TREE_GROUPS = ("model", "router", "expert", "loss", "data", "task", "trainer")
SKIPPED_KEYS = ("_target_", "_partial_")


def _compact(value: Any) -> str:
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}: {_compact(v)}" for k, v in value.items() if k not in SKIPPED_KEYS)
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def config_tree(config: Mapping[str, Any], choices: Mapping[str, Any] | None = None):
    """A rich Tree: one branch per config group (with the option chosen) whose settings sit on
    one wrapped line, then the top-level values (experts, seed, ...)."""
    from rich.tree import Tree

    choices = choices or {}
    applied = [f"{group}={choices[group]}" for group in ("experiment", "debug", "hparams_search") if choices.get(group)]
    tree = Tree("[bold]config[/bold]" + (f" ({', '.join(applied)})" if applied else ""))
    for group in TREE_GROUPS:
        node = config.get(group)
        if not isinstance(node, Mapping):
            continue
        target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        label = f"[bold]{group}[/bold]: {choices.get(group) or ''}" + (f" ({target})" if target else "")
        if group == "model" and is_dense_twin(node):
            label += " [bold]dense twin[/bold]: no MoE layer (router, expert and loss unused)"
        branch = tree.add(label)
        settings = [f"{k}={_compact(v)}" for k, v in node.items() if k not in SKIPPED_KEYS and not isinstance(v, Mapping)]
        if settings:
            branch.add(" ".join(settings))
    top = [f"{k}={_compact(v)}" for k, v in config.items()
           if not isinstance(v, Mapping) and v is not None and k not in SKIPPED_KEYS]
    if top:
        tree.add(" ".join(top))
    return tree


def print_config_tree(config: Mapping[str, Any], choices: Mapping[str, Any] | None = None) -> None:
    from rich.console import Console

    Console(soft_wrap=False).print(config_tree(config, choices))


def summary_line(metrics: Mapping[str, float], best: str | None, last: str | None, metrics_path: str,
                 seconds: float | None = None, dense_twin: bool = False) -> str:
    """`moelab: done in 35 s: val/acc 0.9667, test/acc 0.963; best <path>; last <path>; metrics <path>`:
    the final val/ and test/ metrics, the checkpoints and the record (`dense twin` after
    "done" for a model without MoE layers)."""
    shown = [f"{name} {value:.4g}" for name, value in sorted(metrics.items())
             if name.startswith(("val/", "test/")) and "/aux" not in name]
    done = "done" + (" (dense twin)" if dense_twin else "") + (f" in {seconds:.0f} s" if seconds is not None else "")
    parts = [done + ": " + (", ".join(shown) or "no metrics")]
    if best:
        parts.append(f"best {best}")
    if last:
        parts.append(f"last {last}")
    parts.append(f"metrics {metrics_path}")
    return "moelab: " + "; ".join(parts)


def run_hparams(config: Mapping[str, Any], choices: Mapping[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The settings that tell MoE runs apart, flat, for TensorBoard's HPARAMS dashboard, in
    the order it shows them: router, experts, k, expert kind, the keys set on the command line
    (a sweep's swept keys among them), every loss weight, model and data (the task's own
    hyperparameters follow: moelab.tasks.base.hparams_in_order)."""
    choices = choices or {}
    router = config.get("router") or {}
    expert = config.get("expert") or {}
    model = config.get("model") or {}
    params: dict[str, Any] = {
        "router": choices.get("router") or str(router.get("_target_", "")).rsplit(".", 1)[-1],
        "experts": config.get("experts"),
        "k": router.get("k"),
        "expert": choices.get("expert") or expert.get("activation"),
    }
    for override in overrides:  # the command line's keys, as the run resolved them
        key = override.lstrip("+~").split("=", 1)[0]
        if "." in key and not key.startswith("hydra.") and key not in params:
            value = _select(config, key)
            if isinstance(value, (int, float, str, bool)) or value is None:
                params[key] = value
    rest = {
        "expert_activation": expert.get("activation"),
        "granularity": expert.get("granularity", 1),
        "num_shared": expert.get("num_shared", 0),
        "capacity_factor": router.get("capacity_factor"),
        "model": choices.get("model") or str(model.get("_target_", "")).rsplit(".", 1)[-1],
        "moe_every": model.get("moe_every"),
        "data": choices.get("data"),
        "seed": config.get("seed"),
    }
    for key, value in rest.items():
        params.setdefault(key, value)
    for name, weight in (config.get("loss") or {}).items():
        params[f"loss/{name}"] = weight
    # TensorBoard's hparams take numbers, strings and booleans: None reads as "none".
    return {key: ("none" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in params.items()}


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
