"""The divergence guard: a step whose loss or gradients are not finite is never applied, and
the run ends with `Diverged`, naming the step and where its forward pass first went
non-finite. The guard decides on the device, so a training step reads nothing back: the
host looks at its verdict on logging steps and before every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from moelab.moe.routed import routed_layers


class Diverged(RuntimeError):
    """Training met a non-finite loss or gradient norm; that step's update (and every later
    one) was skipped, so the weights stay those of the last finite step."""

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


class DivergenceGuard:
    """The verdict on every optimizer step, kept on the device.

    `update` takes the step's gradient norm (made non-finite by a non-finite loss, see
    MoETask.configure_gradient_clipping) and returns `found_inf`, the flag a fused optimizer
    reads to skip its update on the device, as AMP's loss scaling does (Micikevicius et al.
    2018): 1 from the first non-finite step on, so a diverged run's weights stay those of
    its last finite step whatever follows. It also keeps, on the device, that step's number,
    loss and norm. `check` reads the verdict back (one sync) and raises `Diverged`; the task
    calls it on logging steps, before every checkpoint and when the fit ends.

    The batches of the steps since the last check are kept (references, at most
    `max_batches`), so the diagnosis reruns the forward pass of the step that diverged.
    """

    def __init__(self, max_batches: int = 16) -> None:
        self.max_batches = max_batches
        self.step_t: Tensor | None = None  # the current optimizer step, counted on the device
        self.first_bad_t: Tensor | None = None  # the first non-finite step, -1 while there is none
        self.loss_t: Tensor | None = None
        self.norm_t: Tensor | None = None
        self.batches: dict[int, Any] = {}

    def start(self, step: int, device: torch.device) -> None:
        """At the start of a fit (or a resumed one) at optimizer step `step`."""
        self.step_t = torch.tensor(step, dtype=torch.long, device=device)
        self.first_bad_t = torch.tensor(-1, dtype=torch.long, device=device)
        self.loss_t = torch.zeros((), dtype=torch.float32, device=device)
        self.norm_t = torch.zeros((), dtype=torch.float32, device=device)
        self.batches = {}

    def keep(self, step: int, batch: Any) -> None:
        self.batches[step] = batch
        if len(self.batches) > self.max_batches:
            del self.batches[min(self.batches)]

    def update(self, loss: Tensor, grad_norm: Tensor) -> Tensor:
        """Record this step (device ops only); returns `found_inf` (float32 0 or 1)."""
        if self.step_t is None or self.step_t.device != grad_norm.device:
            self.start(0, grad_norm.device)
        first = (self.first_bad_t < 0) & ~torch.isfinite(grad_norm)
        self.first_bad_t = torch.where(first, self.step_t, self.first_bad_t)
        self.loss_t = torch.where(first, loss.detach().float().to(grad_norm.device), self.loss_t)
        self.norm_t = torch.where(first, grad_norm.detach().float(), self.norm_t)
        self.step_t = self.step_t + 1
        return (self.first_bad_t >= 0).float()

    def check(self, task: L.LightningModule) -> None:
        """Raise `Diverged` if any step since the fit started was not finite (one sync)."""
        if self.first_bad_t is None:
            return
        step = int(self.first_bad_t)
        if step < 0:
            return
        what = f"loss {float(self.loss_t):.4g}, gradient norm {float(self.norm_t):.4g}"
        batch = self.batches.get(step)
        if batch is None:
            culprit = "(the batch of that step is no longer held, so where it first went non-finite is unknown)"
        else:
            try:
                culprit = first_nonfinite(task, batch)
            except Exception as exc:  # noqa: BLE001 - the divergence is the news, not the diagnosis
                culprit = f"(the diagnosis failed: {type(exc).__name__})"
        self.batches = {}
        raise Diverged(step, f"{what}; {culprit}")
