"""The moelab checkpoint: what a task's checkpoint holds and how it is read and written.

A checkpoint is Lightning's: the task's state dict (the model's weights under `model.`),
optimizer and loop state, and the run's composed config under `moelab_config`, so the model
can be rebuilt from the file alone. It is one `torch.save` file, or the folder `fsdp` and
`fsdp_ep` runs write (torch.distributed.checkpoint shards, the config in `meta.pt`).

Files load with `torch.load(weights_only=True)` only: tensors and plain values, never
arbitrary pickled objects. A sharded folder's metadata is read through
`torch.distributed.checkpoint`, whose metadata file is a pickle: load those only from a
trusted source. Every failure to read is one line (ConfigError) naming the setting the path
came from.
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

from moelab.models.build import build_model
from moelab.models.targets import check_targets
from moelab.moe.errors import ConfigError

CONFIG_KEY = "moelab_config"  # where moelab checkpoints keep the run's composed config


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


def load_model(path: str, key: str = "teacher") -> nn.Module:
    """The model a moelab checkpoint (one file or a sharded folder) holds, in eval mode."""
    weights, config = read_model_state(path, key)
    return model_from_state(weights, config, key, path)


def model_from_state(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, key: str, path: str) -> nn.Module:
    """The model `config` describes, holding `weights`, in eval mode. The config came from a
    file: every `_target_` in it is checked first (moelab.models.targets), the data, task and
    trainer settings too, since eval.py and predict.py build those from it next."""
    if config is None:
        raise ConfigError(f"{key}={path} carries no run config: use a checkpoint written by moelab's train.py")
    check_targets(config, f"{key}={path}")
    model = build_model(config)
    model.load_state_dict(weights)
    return model.eval()


def checkpoint_step(path: str) -> int | None:
    """The optimizer step a checkpoint was saved at (None if it does not say)."""
    target = Path(path)
    try:
        if target.is_dir():
            return int(torch.load(target / "meta.pt", weights_only=True).get("global_step"))
        return int(torch.load(target, weights_only=True, map_location="cpu", mmap=True).get("global_step"))
    except Exception:  # noqa: BLE001 - the step is a label, not needed to evaluate
        return None
