"""The benchmarks' plain loop trains what moelab trains: from the same seed, over the same
batches, with the same optimizer, schedule and clipping, its weights after a few steps
equal those of `trainer.fit` (so a speed ratio between them measures only the loop around).
And a smoke run of scripts/bench_overhead.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moelab.bench.training import compose_run, train_with_fit, train_with_plain_loop

from ..conftest import ROOT

LM = ["experiment=lm_pystdlib", "model.d_model=32", "model.depth=2", "model.num_heads=2", "data.seq_len=16",
      "data.batch_size=4", "data.max_bytes=200000"]
VIT = ["model.embed_dim=32", "model.num_heads=2"]


@pytest.mark.parametrize("model", [LM, VIT], ids=["lm", "vit"])
def test_the_plain_loop_and_the_fit_reach_the_same_weights(tmp_path, model):
    overrides = [*model, "callbacks=none", "logger=csv", "trainer.log_every_n_steps=1"]
    _, fitted = train_with_fit(compose_run(overrides, tmp_path / "fit", 6), 2, 3)
    _, plain = train_with_plain_loop(compose_run(overrides, tmp_path / "plain", 6), 2, 3)
    fitted_params, plain_params = dict(fitted.named_parameters()), dict(plain.named_parameters())
    assert fitted_params.keys() == plain_params.keys()
    moved = 0
    for name, weight in fitted_params.items():
        torch.testing.assert_close(plain_params[name], weight, atol=1e-6, rtol=1e-5, msg=name)
        moved += not torch.equal(weight, compose_and_init(model, tmp_path)[name])
    assert moved > len(fitted_params) // 2  # they trained, and trained alike


def compose_and_init(model, tmp_path) -> dict[str, torch.Tensor]:
    from lightning.pytorch import seed_everything

    from moelab.models.build import build_model

    cfg = compose_run(model, tmp_path / "init", 1)
    seed_everything(cfg.seed, verbose=False)
    return dict(build_model(cfg).named_parameters())


def test_bench_overhead_runs_and_prints_its_table():
    result = subprocess.run([sys.executable, "scripts/bench_overhead.py", "--steps", "3", "--warmup", "2", "--rounds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| LM |", "| ViT |"))]
    assert len(rows) == 2 and all(len(row.split("|")) == 8 for row in rows), result.stdout
