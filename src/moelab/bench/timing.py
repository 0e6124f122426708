"""Timing for the benchmarks in scripts/: forward + backward steps timed side by side, the
columns taking turns step by step so that a shared machine's drifting speed hits them alike,
and a layer pinned to one dispatch path or compiled."""

from __future__ import annotations

import statistics
import time

import torch

from moelab.moe import routing


def step_timer(fn, x, device: torch.device, dtype: torch.dtype, params: torch.nn.Module | None = None):
    """A function that runs one forward + backward of `fn` and returns its ms; `params`: the
    module whose gradients to clear, if `fn` is not that module itself (a compiled or wrapped one)."""
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = fn(x)
            out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    def clear():  # as optimizer.zero_grad(set_to_none=True): no accumulation into old gradients
        x.grad = None
        module = params if params is not None else fn
        if isinstance(module, torch.nn.Module):
            module.zero_grad(set_to_none=True)

    def timed_step() -> float:
        clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start)

    return timed_step


def timed(fn, x, steps: int, device: torch.device, dtype: torch.dtype, params: torch.nn.Module | None = None) -> float:
    """Median ms of forward + backward (after 3 warm-up steps)."""
    return timed_side_by_side({"it": step_timer(fn, x, device, dtype, params)}, steps)["it"]


def timed_side_by_side(timers: dict, steps: int) -> dict[str, float]:
    """Median ms of each timer's step, the timers taking turns step by step (after 3 warm-up
    steps each), so drifts of a shared machine's speed hit every column alike."""
    times: dict[str, list[float]] = {key: [] for key in timers}
    for key, timer in timers.items():
        for _ in range(3):
            timer()
    for _ in range(steps):
        for key, timer in timers.items():
            times[key].append(timer())
    return {key: statistics.median(values) for key, values in times.items()}


def on_path(fn, gathers: bool):
    """`fn` run with every token-choice plan on one path: row gathers (True) or the generic
    index + scatter-add (False), whatever the device's default (`routing.GATHER_ROWS`)."""

    def run(*args):
        routing.GATHER_ROWS = gathers
        try:
            return fn(*args)
        finally:
            routing.GATHER_ROWS = None

    return run


def try_compile(layer: torch.nn.Module):
    compiled = torch.compile(layer)

    def run(x):
        try:
            return compiled(x)
        except Exception as error:  # e.g. fp32 on CPU: _grouped_mm's meta function wants bf16
            raise CompileFailed(str(error).splitlines()[0]) from None

    return run


class CompileFailed(RuntimeError):
    pass
