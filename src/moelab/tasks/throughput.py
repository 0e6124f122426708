"""Training throughput and model FLOPs utilisation (MFU) over active FLOPs, logged on
logging steps: `train/tokens_per_s` (language) or `train/images_per_s` (vision), and
`train/mfu` where the device's peak is known.

A token's training FLOPs are 6·N_active (N_active: the parameters one token uses, without
embeddings, which are lookups) plus attention's 12·L·s·d for a full attention over s tokens
(6·L·s·d for causal attention, which computes half the score matrix), the PaLM appendix B
convention. MFU = FLOPs per second / the device's peak dense bf16 rate.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moelab.moe.routed import active_parameters

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity); the longest
# name contained in torch.cuda.get_device_name() wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0,
    "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16 FLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def active_non_embedding_parameters(model: nn.Module) -> int:
    """Parameters one token uses, embedding lookups excluded; an embedding tied to the
    output head (a Linear with the same weight) is counted once, as the head's matmul."""
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    heads = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    untied = sum(e.numel() for e in embeddings if not any(e is h for h in heads))
    return active_parameters(model) - untied


def training_flops_per_token(model: nn.Module, depth: int, width: int, seq_len: int, causal: bool) -> float:
    """6·N_active (embedding lookups excluded) + attention's 12·L·s·d (6·L·s·d causal)."""
    attention = (6 if causal else 12) * depth * seq_len * width
    return 6.0 * active_non_embedding_parameters(model) + attention


class Throughput:
    """Items per second since the epoch's first step (data, forward, backward, optimizer;
    validation excluded), averaged, with MFU when the FLOPs per item and the peak are
    known. A reading of the machine, not a result: it goes to the loggers on logging steps,
    never into metrics.json, so identical runs keep identical records."""

    def __init__(self, name: str) -> None:
        self.name = name  # e.g. "tokens_per_s"
        self.start: float | None = None
        self.items = 0
        self.peak: float | None | bool = False  # the device's peak, looked up once (False: not yet)
        self.latest: dict[str, float] = {}  # the values of the last logging step (the progress lines)

    def restart(self) -> None:
        self.start = None

    def step(self, task, items: int, flops_per_item: float | None) -> None:
        now = time.perf_counter()
        if self.start is None:  # the first step of an epoch starts the clock (it includes start-up)
            self.start, self.items = now, 0
            return
        self.items += items
        if (task.global_step + 1) % max(1, task.trainer.log_every_n_steps):
            return
        rate = self.items / max(now - self.start, 1e-9)
        values = {f"train/{self.name}": rate}
        if self.peak is False:
            self.peak = peak_flops(task.device)
        peak = self.peak
        if peak and flops_per_item:
            values["train/mfu"] = rate * flops_per_item / peak  # this rank's rate on this rank's device
        self.latest = values
        for logger in task.loggers:
            logger.log_metrics(values, step=task.global_step)
