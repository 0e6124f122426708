"""The lifecycle walk-through's workbench: `Lab` runs `train.py` and `scripts/merge_experts.py`
jobs once each in their own folders, and reads back their metrics, checkpoints and per-token
losses for docs/lifecycle.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.studies.study import ROOT

BASE = ["experiment=lm_pystdlib", "data.train_steps_per_epoch=100", "callbacks.progress=null"]
QUICK = ["data.train_steps_per_epoch=3", "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000",
         "model.d_model=32", "model.ffn_hidden=64", "model.depth=2", "model.num_heads=2", "task.sample_tokens=4",
         "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "task.warmup_steps=1"]
CKPT = "checkpoints/last.ckpt"


class Lab:
    """Runs train.py jobs in folders under `out`, once each, and reads what they wrote."""

    def __init__(self, out: Path, quick: bool) -> None:
        self.out, self.quick = out, quick
        self.shown_out = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
        self.minutes: dict[str, float] = {}
        self.commands: dict[str, str] = {}

    def folder(self, name: str) -> Path:
        return self.out / name

    def ckpt(self, name: str) -> Path:
        return self.folder(name) / CKPT

    def train(self, name: str, epochs: int, *overrides: str) -> dict[str, float]:
        """`python train.py` with BASE, `epochs` × 100 steps and `overrides`."""
        folder = self.folder(name)
        args = [*BASE, f"trainer.max_epochs={epochs}", *overrides]
        shown = [a.replace(str(self.out), self.shown_out) for a in args]
        self.commands[name] = "python train.py " + " ".join(shown)
        if self.quick:  # the quick settings replace the same keys
            keys = {q.split("=", 1)[0] for q in QUICK}
            args = [a for a in args if a.split("=", 1)[0] not in keys] + QUICK
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("status") == "ok":
            print(f"  {name}: kept ({folder})", flush=True)
        else:
            print(f"  {name}: {self.commands[name]}", flush=True)
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={folder}", *args], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:
                raise SystemExit(f"moelab: error: lifecycle step {name} failed: {result.stderr.strip().splitlines()[-1]}")
            (folder / "wall_minutes.txt").write_text(f"{(time.perf_counter() - start) / 60:.2f}\n")
        wall = folder / "wall_minutes.txt"
        if wall.is_file():
            self.minutes[name] = float(wall.read_text())
        return json.loads(metrics_file.read_text())

    def merge(self, source: str) -> tuple[str, list[list[str]]]:
        """scripts/merge_experts.py on `source`'s checkpoint: the command and its table rows."""
        args = [str(self.ckpt(source)), "--to", "4", "2", "1", "--method", "mc-smoe", "neighbour-usage",
                "neighbour-mean", "weight-similarity"]
        command = "python scripts/merge_experts.py " + " ".join(args).replace(str(self.out), self.shown_out)
        result = subprocess.run([sys.executable, "scripts/merge_experts.py", *args], cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"moelab: error: merging failed: {result.stderr.strip().splitlines()[-1]}")
        lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
        return command, [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def token_losses(model: torch.nn.Module, data, split: str = "val") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy over every window of `split`, with each position's input
    and target ids (one pass, batches of 64 windows)."""
    tokens = torch.from_numpy(data.tokens[split].astype("int64"))
    seq = data.seq_len
    count = (len(tokens) - 1) // seq
    losses, inputs, targets = [], [], []
    with torch.no_grad():
        for start in range(0, count, 64):
            rows = torch.arange(start, min(start + 64, count)) * seq
            index = rows[:, None] + torch.arange(seq + 1)
            window = tokens[index]
            logits = model(window[:, :-1]).float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="none"))
            inputs.append(window[:, :-1].flatten())
            targets.append(window[:, 1:].flatten())
    return torch.cat(losses), torch.cat(inputs), torch.cat(targets)


def load(path: Path):
    from moelab.tasks.checkpoint_io import load_model  # imports Lightning and Hydra: only when needed

    return load_model(str(path), "checkpoint")


def datamodule_of(folder: Path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moelab.models.targets import check_targets

    stored = folder / ".hydra" / "config.yaml"
    config = OmegaConf.load(stored)
    check_targets(config.data, str(stored))  # a run folder's config is a file: data, not code
    data = instantiate(config.data)
    data.setup("fit")
    return data


def parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def bpb(loss: float) -> float:
    return loss / math.log(2)  # bytes: one token is one byte


def fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
