"""Training steps timed two ways over the same model and data: through moelab (`trainer.fit`
with the task, callbacks and loggers a config names) and through a plain PyTorch loop
(forward, cross-entropy + auxiliary losses, backward, clipping, the same AdamW and schedule).
Their ratio is the platform's overhead per step. Both time whole stretches of steps with
one device sync at each end, so neither pays for syncs the other does not make."""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch import Callback, seed_everything
from omegaconf import DictConfig, open_dict

from moelab.models.build import build_model
from moelab.moe.routed import after_optimizer_step, collect_aux_losses
from moelab.run import resolvers  # noqa: F401 - the ${moelab.*:} resolvers the configs use
from moelab.run.build import build
from moelab.tasks.optim import adamw, adamw_param_groups, warmup_cosine

CONF = Path(__file__).resolve().parents[3] / "conf"


def compose_run(overrides: Sequence[str], output_dir: Path, steps: int) -> DictConfig:
    """The config `python train.py <overrides>` runs, for `steps` optimizer steps, writing into
    `output_dir`, without validation or testing (only training steps are timed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.max_steps, cfg.trainer.max_epochs = steps, -1
        cfg.trainer.limit_val_batches, cfg.trainer.num_sanity_val_steps = 0, 0
        cfg.test = False
    return cfg


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def items_in(batch: Any) -> int:
    """What throughput counts in a batch: tokens (integer ids, the LM) or images."""
    inputs = batch[0]
    return inputs.numel() if not inputs.is_floating_point() else inputs.shape[0]


@dataclass
class Timing:
    ms_per_step: float  # per optimizer step
    items_per_s: float  # tokens (LM) or images (ViT) per second


class StretchTimer(Callback):
    """Wall time from the start of optimizer step `warmup` to the start of step `warmup +
    steps` (one sync at each end, none in between), and the items trained on in between:
    whatever the loop does per step, callbacks and loggers included, is in it."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start: float | None = None
        self.seconds: float | None = None
        self.items = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize()
            self.start = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps and self.seconds is None:
            synchronize()
            self.seconds = time.perf_counter() - self.start
        if self.start is not None and self.seconds is None:
            self.items += items_in(batch)


def fit_timing(cfg: DictConfig, warmup: int, steps: int, callbacks: Sequence[Callback] = ()) -> Timing:
    """Per optimizer step of `trainer.fit` as the config builds it (its callbacks and loggers)."""
    return train_with_fit(cfg, warmup, steps, callbacks)[0]


def train_with_fit(cfg: DictConfig, warmup: int, steps: int,
                   callbacks: Sequence[Callback] = ()) -> tuple[Timing, torch.nn.Module]:
    """(timing, the trained model) of `warmup + steps` optimizer steps of `trainer.fit`."""
    with open_dict(cfg):
        cfg.trainer.max_steps = warmup + steps + 1
    seed_everything(cfg.seed, workers=True, verbose=False)  # as moelab.run.train.run
    datamodule, task, trainer = build(cfg)
    timer = StretchTimer(warmup, steps)
    trainer.callbacks.extend([timer, *callbacks])
    trainer.fit(task, datamodule=datamodule)
    if timer.seconds is None:
        raise RuntimeError(f"the fit stopped before step {warmup + steps}")
    return Timing(1000 * timer.seconds / steps, timer.items / timer.seconds), task.model


def fit_step_ms(cfg: DictConfig, warmup: int, steps: int) -> float:
    """ms per optimizer step of `trainer.fit` as the config builds it."""
    return fit_timing(cfg, warmup, steps).ms_per_step


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not inputs.is_floating_point():  # a language model: its loss head (MoELM(ids, targets))
        return model(inputs, targets)
    return F.cross_entropy(model(inputs).float(), targets)


def plain_loop_timing(cfg: DictConfig, warmup: int, steps: int) -> Timing:
    """Per optimizer step of a plain loop over the same model (train_with_plain_loop)."""
    return train_with_plain_loop(cfg, warmup, steps)[0]


def train_with_plain_loop(cfg: DictConfig, warmup: int, steps: int) -> tuple[Timing, torch.nn.Module]:
    """(timing, the trained model) of `warmup + steps` optimizer steps of a plain loop over the
    same model (the same seed), data order, optimizer (fused AdamW where the device has it),
    schedule, clipping, gradient accumulation and precision as `train_with_fit`, with no
    logging; `task.compile` compiles the whole model, as a plain loop would. Its weights after
    a few steps are moelab's (tests/bench/test_training.py): only the loop around differs."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu")
    seed_everything(cfg.seed, workers=True, verbose=False)  # as moelab.run.train.run, then build's order
    datamodule = instantiate(cfg.data, _convert_="all")
    model = build_model(cfg).to(device).train()
    datamodule.setup("fit")
    task = cfg.task
    optimizer, _ = adamw(adamw_param_groups(model, task.weight_decay), task.lr, tuple(task.betas))
    total = warmup + steps + 1  # as the fit's max_steps (train_with_fit)
    scheduler = warmup_cosine(optimizer, min(task.warmup_steps, total), total, task.min_lr_ratio)
    clip = cfg.trainer.get("gradient_clip_val")
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    precision = str(cfg.trainer.get("precision", "32-true"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16-mixed") else nullcontext()
    if task.get("compile"):
        model.compile()
    batches = itertools.cycle(datamodule.train_dataloader())
    start, seconds, items = 0.0, 0.0, 0
    for step in range(total):  # timed from the start of step `warmup` to that of `warmup + steps`, as the fit
        if step in (warmup, warmup + steps):
            synchronize()
            start, seconds = (time.perf_counter(), 0.0) if step == warmup else (start, time.perf_counter() - start)
        for _ in range(accumulate):
            inputs, targets = (t.to(device, non_blocking=True) for t in next(batches))
            items += items_in((inputs,)) if warmup <= step < warmup + steps else 0
            with autocast:
                loss = _loss(model, inputs, targets)
                aux, _ = collect_aux_losses(model, per_name=False)
                loss = loss if aux is None else loss + aux
            (loss / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        after_optimizer_step(model)
    return Timing(1000 * seconds / steps, items / seconds), model


def plain_loop_step_ms(cfg: DictConfig, warmup: int, steps: int) -> float:
    """ms per optimizer step of the plain loop (plain_loop_timing)."""
    return plain_loop_timing(cfg, warmup, steps).ms_per_step
