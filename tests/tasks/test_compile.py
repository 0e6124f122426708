"""task.compile: each transformer block compiled per block; the training matches eager
over 12 CPU steps, and routing's shapes cause no recompile per step. The test compiles with
dynamo's `eager` backend (its tracing, guards and recompiles, no code generation), which
keeps it fast on 2 cores; inductor, the default, compiles for minutes on 2 cores and is
run by scripts/bench_train.py. (`aot_eager` is no use here: on the CPU it predicts
contiguous strides for an elementwise product of an expanded gradient that the eager
kernel does not produce, and its backward's view then fails.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from moelab.run.train import run

from ..conftest import LM_FAST, VIT_FAST, compose_config, one_line_error



def _fast(base: list[str], steps: int) -> list[str]:
    return [o for o in base if not o.startswith("trainer.limit_train_batches")] + [
        f"trainer.limit_train_batches={steps}", "test=false"]


def _graphs_of_compiled_run(folder, overrides, mode: str = "true") -> int:
    torch._dynamo.reset()
    counters.clear()
    run(compose_config(folder, *overrides, f"task.compile={mode}", "task.compile_backend=eager"))
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("model", ["vit", "lm"])
def test_compiled_blocks_train_like_eager_without_a_recompile_per_step(tmp_path, model):
    base = VIT_FAST if model == "vit" else LM_FAST
    run(compose_config(tmp_path / "eager", *_fast(base, 12)))
    graphs_12 = _graphs_of_compiled_run(tmp_path / "compiled", _fast(base, 12))
    eager = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    compiled = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert compiled["step"] == eager["step"] == 12
    for name in ("train/loss", "val/loss"):
        assert compiled[name] == pytest.approx(eager[name], rel=1e-5, abs=1e-6), name
    if model == "vit":
        # Routing's shapes do not depend on the data: 4 steps compile the same graphs as 12
        # (training and evaluation variants, the fp32 grouped matmul's graph breaks included).
        assert graphs_12 == _graphs_of_compiled_run(tmp_path / "four", _fast(base, 4)) > 0


def test_the_whole_model_compiled_trains_like_eager(tmp_path):
    """task.compile=model: one compiled forward for the LM, its chunked loss head included."""
    run(compose_config(tmp_path / "eager", *_fast(LM_FAST, 6)))
    graphs = _graphs_of_compiled_run(tmp_path / "compiled", _fast(LM_FAST, 6), mode="model")
    eager = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    compiled = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert graphs > 0 and compiled["step"] == eager["step"] == 6
    for name in ("train/loss", "val/loss"):
        assert compiled[name] == pytest.approx(eager[name], rel=1e-5, abs=1e-6), name
    assert "task.compile=everything must be false, blocks (or true) or model" in one_line_error(
        compose_config(tmp_path / "bad", *VIT_FAST, "task.compile=everything"))


def test_compile_needs_transformer_blocks(tmp_path, monkeypatch):
    from moelab.tasks import base

    monkeypatch.setattr(base, "transformer_blocks", lambda model: [])
    line = one_line_error(compose_config(tmp_path, *VIT_FAST, "task.compile=true"))
    assert "task.compile=true compiles transformer blocks; MoEViT has none" in line
