"""Checking a checkpoint before a run uses it: `ckpt_path=` (resume) and `init_from=` (start
from its weights, or upcycle a dense twin). A folder where a file is needed, a checkpoint
without optimizer state, or one of another architecture each stop with one line that says
what is wrong and what to do."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from moelab.moe.errors import ConfigError
from moelab.tasks.checkpoint_io import inspect_checkpoint, read_model_state

# Lightning's own ckpt_path keywords, resolved by Lightning itself.
LIGHTNING_KEYWORDS = ("last", "hpc", "best", "registry")
ARCHITECTURE_KEYS = ("experts", "model", "router", "expert")
# Settings of those groups that change how the same weights are computed, not what they are.
HOW_NOT_WHAT = ("expert.kernel",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys=ARCHITECTURE_KEYS) -> list[str]:
    """`name: checkpoint A, config B` for every architecture setting that differs."""
    before = _flatten({k: saved.get(k) for k in keys})
    after = _flatten({k: current.get(k) for k in keys})
    differences = []
    for name in sorted(set(before) | set(after)):
        if name.endswith("_target_") or name.endswith("_partial_") or name in HOW_NOT_WHAT:
            continue
        if before.get(name) != after.get(name):
            differences.append(f"{name}: checkpoint {before.get(name, '(unset)')}, config {after.get(name, '(unset)')}")
    return differences


def shape_differences(saved: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    """Readable differences between a checkpoint's weights and the model's, most telling first."""
    notes: list[str] = []
    mismatched = [k for k in expected if k in saved and tuple(saved[k]) != tuple(expected[k])]
    expert_counts = {
        (saved[k][0], expected[k][0]) for k in mismatched
        if len(expected[k]) == 3 and len(saved[k]) == 3 and saved[k][0] != expected[k][0]
    }
    for before, after in sorted(expert_counts):
        notes.append(f"checkpoint has {before} experts per layer, config has experts={after}")
    if mismatched:
        k = mismatched[0]
        notes.append(f"{len(mismatched)} weight(s) differ in shape, e.g. {k}: checkpoint {tuple(saved[k])}, model {tuple(expected[k])}")
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        notes.append(f"{len(missing)} weight(s) of the model are not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        notes.append(f"{len(unexpected)} weight(s) of the checkpoint are not in the model, e.g. {unexpected[0]}")
    return notes


def _model_class(config: Mapping[str, Any]) -> str:
    return str((config.get("model") or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def _explain(notes: list[str], saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[str]:
    """The few facts that say why weights differ: the expert count, the settings that differ
    (when both configs are known), else the weights themselves."""
    parts = [note for note in notes if "experts per layer" in note]
    if saved is not None and current is not None:
        if _model_class(saved) != _model_class(current):
            parts.append(f"the checkpoint holds a {_model_class(saved)}, this config builds a {_model_class(current)}")
        else:
            settings = config_differences(saved, current)
            if parts:  # the expert count is said already
                settings = [d for d in settings if not d.startswith("experts:") and "num_experts:" not in d]
            parts += settings[:3]
    return parts or notes[:2]


def check_resumable(path: str, task: nn.Module, sharded_strategy: bool, config: Mapping[str, Any] | None = None) -> None:
    """Refuse, in one line, a `ckpt_path` this run cannot resume from."""
    if path in LIGHTNING_KEYWORDS:
        return
    info = inspect_checkpoint(path)
    if info.sharded and not sharded_strategy:
        raise ConfigError(
            f"ckpt_path={path} is a sharded checkpoint (a folder written under trainer=fsdp or fsdp_ep): resume it "
            "with trainer=fsdp or trainer=fsdp_ep (any ep that divides experts), or load it into one process "
            "with moelab.parallel.checkpoint.load_sharded_into"
        )
    expected = {key: tuple(value.shape) for key, value in task.state_dict().items()}
    notes = shape_differences(info.shapes, expected)
    if notes:
        details = "; ".join(_explain(notes, info.config, config))
        raise ConfigError(
            f"ckpt_path={path} was trained with another architecture ({details}): resume with the config of the "
            "run that wrote it (its .hydra/config.yaml), or train anew without ckpt_path"
        )
    if not info.resumable:
        raise ConfigError(
            f"ckpt_path={path} holds weights but no optimizer and loop state, so training cannot resume from it: "
            "point ckpt_path at a last.ckpt a run wrote"
        )


def load_model_weights(path: str, key: str = "init_from") -> dict[str, torch.Tensor]:
    """The model weights (`model.` entries of the state dict, prefix removed) of a
    checkpoint file or sharded folder; one-line errors name `key`."""
    return read_model_state(path, key)[0]


def start_from_teacher(student: nn.Module, teacher: nn.Module) -> str:
    """`teacher_init_shared`: copy into the student every teacher weight outside the MoE
    layers, i.e. every entry of the student's state dict that the teacher has under the same
    name and shape (Switch's distillation, Fedus et al. 2021, sec. 5). The student's FFNs
    where the teacher has MoE layers keep their own init. Returns a line for the log."""
    own, theirs = student.state_dict(), teacher.state_dict()
    copied = {k: v for k, v in theirs.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not copied:
        raise ConfigError("teacher_init_shared=true: the teacher shares no weight with this model (another "
                          "architecture or width): train the student as the teacher's dense twin (model.moe_every=0)")
    student.load_state_dict(copied, strict=False)
    kept = [k for k in own if k not in copied]
    return (f"Started {len(copied)} of the student's {len(own)} weights from the teacher"
            + (f"; {len(kept)} keep their init (e.g. {kept[0]})" if kept else ""))


def start_from_weights(model: nn.Module, path: str, upcycle: bool = False, noise: float = 0.0,
                       router_std: float = 0.02, seed: int = 0) -> str:
    """`init_from`: load a checkpoint's weights into `model` for a new run (fresh optimizer,
    step 0). With `upcycle`, the checkpoint is the dense twin and every MoE layer starts
    from its dense FFN (moelab.moe.lifecycle.upcycle). Returns a line for the log."""
    weights = load_model_weights(path)
    if upcycle:
        from moelab.moe.lifecycle.upcycle import upcycle_model

        layers = upcycle_model(model, weights, noise, router_std, seed)
        return f"Upcycled {len(layers)} MoE layer{'s' * (len(layers) != 1)} ({', '.join(layers)}) from the dense model in {path}"
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    notes = shape_differences({k: tuple(v.shape) for k, v in weights.items()}, expected)
    if notes:
        raise ConfigError(
            f"init_from={path} holds another architecture ({'; '.join(notes[:3])}): start from a checkpoint of "
            "this model, or add model.upcycle=true to build this MoE model from its dense twin"
        )
    model.load_state_dict(weights)
    return f"Started from the weights in {path}"
