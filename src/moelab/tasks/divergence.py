"""The divergence guard's vocabulary: `Diverged`, the ending of a run whose loss or gradients
turned non-finite, and the diagnosis of where the forward pass first went non-finite."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from moelab.moe.routed import routed_layers


class Diverged(RuntimeError):
    """Training met a non-finite loss or gradient norm; raised before the optimizer step,
    so the weights stay those of the last finite step."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training diverged at step {step}: {what}")
        self.step, self.what = step, what


def _nonfinite(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_nonfinite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return any(_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(_nonfinite(v) for v in value.values())
    return False


@torch.no_grad()
def first_nonfinite(task: L.LightningModule, batch: Any) -> str:
    """Where the forward pass on `batch` first produced a non-finite value: the input, the
    innermost module whose output did (forward hooks fire on a module's exit, so children
    report before their parents), or an auxiliary loss; else the backward pass."""
    bad_input = _nonfinite(batch[0])  # still run the forward pass: sharded ranks run it together
    routers = {id(layer.router): layer for layer in routed_layers(task)}
    names = {id(module): name for name, module in task.named_modules()}
    found: list[nn.Module] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if not found and _nonfinite(output):
            found.append(module)

    handles = [module.register_forward_hook(hook) for module in task.modules()]
    try:
        task(batch[0])
    finally:
        for handle in handles:
            handle.remove()
    if bad_input:
        return "the input batch holds non-finite values"
    if found:
        module = found[0]
        layer = routers.get(id(module))
        if layer is not None:
            index = layer.layer_index if layer.layer_index is not None else "?"
            return f"the router of MoE layer {index} ({names[id(module)]}) gave non-finite logits first"
        return f"first non-finite output: {names[id(module)]} ({type(module).__name__})"
    for layer in routed_layers(task):
        for name, value in layer.aux_losses.items():
            if not math.isfinite(float(value)):
                return f"the {name} auxiliary loss of MoE layer {layer.layer_index} is {float(value)}"
    return "the forward pass is finite: the backward pass made the gradients non-finite"
