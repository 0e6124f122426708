"""Checking `ckpt_path=` before a run resumes from it: a missing, empty, corrupt or unsafe
file, a folder where a file is needed (or the reverse), and a checkpoint of another
architecture each stop with one line that says what is wrong and what to do.

Files load with `torch.load(weights_only=True)` only: tensors and plain values, never
arbitrary pickled objects. Sharded checkpoints (folders written under `fsdp`/`fsdp_ep`) go
through `torch.distributed.checkpoint`, whose metadata is a pickle: load those only from a
trusted source.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from moelab.moe.errors import ConfigError

# Lightning's own ckpt_path keywords, resolved by Lightning itself.
LIGHTNING_KEYWORDS = ("last", "hpc", "best", "registry")
CONFIG_KEY = "moelab_config"  # where moelab checkpoints keep the run's composed config
ARCHITECTURE_KEYS = ("experts", "model", "router", "expert")


@dataclass
class CheckpointInfo:
    """What resuming needs to know of a checkpoint without loading its tensors."""

    shapes: dict[str, tuple[int, ...]]  # model state key -> shape
    config: dict[str, Any] | None  # the composed config of the run that wrote it
    sharded: bool
    resumable: bool  # has optimizer state (a weights-only file cannot resume training)


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def _unreadable(path: str, exc: BaseException) -> ConfigError:
    """One line for a load failure. torch's own message for a refused pickle advises
    loading with weights_only=False, i.e. running whatever the file holds: never passed on."""
    text = str(exc)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        why = f"it holds a pickled {unsafe.group(1)}, and moelab loads only tensors and plain values (weights_only=True)"
    elif isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        why = "it holds objects other than tensors and plain values, which moelab does not load"
    elif isinstance(exc, EOFError):
        why = "it ends early (truncated?)"
    else:
        why = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'}"
    return ConfigError(f"ckpt_path={path} is not a checkpoint moelab can read: {why}; point ckpt_path at a last.ckpt a run wrote")


def _load_file(path: str) -> Mapping[str, Any]:
    if is_url(path):
        try:
            return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported in one line
            raise _unreadable(path, exc) from None
    file = Path(path)
    if file.stat().st_size == 0:
        raise ConfigError(f"ckpt_path={path} is empty: point ckpt_path at a last.ckpt a run wrote")
    if not zipfile.is_zipfile(file):
        raise ConfigError(
            f"ckpt_path={path} is not a PyTorch checkpoint (not a torch.save archive: truncated, or another kind of file)"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - reported in one line
        raise _unreadable(path, exc) from None


def _sharded_info(folder: Path) -> CheckpointInfo:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (folder / ".metadata").is_file():
        raise ConfigError(
            f"ckpt_path={folder} is a folder but not a sharded checkpoint (no .metadata file in it): "
            "point ckpt_path at a last.ckpt a run wrote"
        )
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - reported in one line
        raise _unreadable(str(folder), exc) from None
    prefix = "state_dict."
    shapes = {
        key[len(prefix):]: tuple(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    meta: Mapping[str, Any] = {}
    meta_file = folder / "meta.pt"
    if meta_file.is_file():
        try:
            meta = torch.load(meta_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported in one line
            raise _unreadable(str(meta_file), exc) from None
    resumable = any(key.startswith("optimizer_") for key in metadata.state_dict_metadata)
    return CheckpointInfo(shapes, meta.get(CONFIG_KEY), sharded=True, resumable=resumable)


def inspect_checkpoint(path: str) -> CheckpointInfo:
    """Shapes, config and kind of a checkpoint file, URL or sharded folder (one-line errors)."""
    if not is_url(path):
        location = Path(path)
        if not location.exists():
            raise ConfigError(f"ckpt_path={path} does not exist (relative paths start from {Path.cwd()})")
        if location.is_dir():
            return _sharded_info(location)
    checkpoint = _load_file(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ConfigError(f"ckpt_path={path} holds no model state (no 'state_dict'): it is not a Lightning checkpoint")
    shapes = {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    resumable = bool(checkpoint.get("optimizer_states")) and "loops" in checkpoint
    return CheckpointInfo(shapes, checkpoint.get(CONFIG_KEY), sharded=False, resumable=resumable)


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
        if name.endswith("_target_") or name.endswith("_partial_"):
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


def model_weights_of(checkpoint: Mapping[str, Any], path: str, key: str) -> dict[str, torch.Tensor]:
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ConfigError(f"{key}={path} holds no model state (no 'state_dict'): it is not a Lightning checkpoint")
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and isinstance(v, torch.Tensor)}


def read_model_state(path: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The model weights (prefix `model.` removed) and the run config of a checkpoint file,
    URL or sharded folder written under `fsdp`/`fsdp_ep`, read into this process (expert
    stacks are stored whole, so no layout is needed). One-line errors name `key`."""
    try:
        if not is_url(path):
            location = Path(path)
            if not location.exists():
                raise ConfigError(f"ckpt_path={path} does not exist (relative paths start from {Path.cwd()})")
            if location.is_dir():
                return _read_sharded_model_state(location)
        checkpoint = _load_file(path)
    except ConfigError as error:
        raise ConfigError(str(error).replace("ckpt_path", key)) from None
    return model_weights_of(checkpoint, path, key), checkpoint.get(CONFIG_KEY)


def _read_sharded_model_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    info = _sharded_info(folder)  # one-line errors for a folder that is not a checkpoint
    metadata = FileSystemReader(str(folder)).read_metadata()
    prefix = "state_dict.model."
    weights = {
        name[len(prefix):]: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for name, item in metadata.state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    if not weights:
        raise ConfigError(f"ckpt_path={folder} holds no model weights (no state_dict.model.* entries)")
    state = {"state_dict": {f"model.{name}": tensor for name, tensor in weights.items()}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    except Exception as exc:  # noqa: BLE001 - reported in one line
        raise _unreadable(str(folder), exc) from None
    return {name: state["state_dict"][f"model.{name}"] for name in weights}, info.config


def save_model_state(path: Path, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], sharded: bool) -> Path:
    """Write a weights-only moelab checkpoint that `init_from`, `teacher` and the scripts
    read: one file, or (`sharded`) a folder in the layout `fsdp`/`fsdp_ep` runs write,
    with the config in its meta.pt. It has no optimizer state, so it starts runs but
    does not resume them."""
    state = {f"model.{name}": tensor.detach().contiguous() for name, tensor in weights.items()}
    if not sharded:
        torch.save({"state_dict": state, CONFIG_KEY: dict(config)}, path)
        return path
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": state}, checkpoint_id=str(path), no_dist=True)
    torch.save({CONFIG_KEY: dict(config)}, path / "meta.pt")
    return path


def start_from_weights(model: nn.Module, path: str, upcycle: bool = False, noise: float = 0.0,
                       router_std: float = 0.0, seed: int = 0) -> str:
    """`init_from`: load a checkpoint's weights into `model` for a new run (fresh optimizer,
    step 0). With `upcycle`, the checkpoint is the dense twin and every MoE layer starts
    from its dense FFN (moelab.models.upcycle). Returns a line for the log."""
    weights = load_model_weights(path)
    if upcycle:
        from moelab.models.upcycle import upcycle_model

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
