"""bf16 on every path: under bf16 autocast on the CPU every router keeps its math in fp32
while the experts' grouped matmuls get bf16 inputs, and `trainer.precision=bf16-mixed`
trains both models with every router they accept to finite losses."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from moelab.moe import GroupedExperts, MoELayer
from moelab.run.train import run

from ..conftest import CONF, LM_FAST, VIT_FAST, compose_config
from .test_no_host_sync import ROUTERS

ROUTER_CONFIGS = sorted(p.stem for p in (CONF / "router").glob("*.yaml"))
# The routers the causal LM accepts with their defaults (the others are refused, tested in test_lm.py).
LM_ROUTERS = ["aux_free", "cosine", "dense", "hash", "noisy_topk", "topk"]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_math_stays_fp32_and_experts_get_bf16(name, monkeypatch):
    """Under autocast the router's logits and probabilities are those of the same layer run
    in fp32 (the same noise and random draws), to fp32 rounding: its math never goes through
    bf16, which would move them by ~1e-4 (a dtype check alone passes a bf16 matmul cast back
    to fp32). The grouped matmuls get bf16 operands."""
    torch.manual_seed(0)
    fine = name == "topk_fine_shared"
    experts = partial(GroupedExperts, num_experts=8, granularity=2 if fine else 1, num_shared=1 if fine else 0)
    layer = MoELayer(32, 64, ROUTERS[name], experts, aux_loss_weights={"zloss": 1e-3} if name != "cosine" else {})
    seen = []
    real = torch._grouped_mm

    def spy(a, b, **kwargs):
        seen.append((a.dtype, b.dtype))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    x = torch.randn(2, 8, 32, requires_grad=True)
    torch.manual_seed(1)
    with torch.no_grad():
        layer(x)
    fp32_plan = layer.last_plan
    seen.clear()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    plan = layer.last_plan
    assert plan.router_probs_TE.dtype == torch.float32, name
    torch.testing.assert_close(plan.router_probs_TE, fp32_plan.router_probs_TE, atol=1e-6, rtol=0, msg=name)
    if hasattr(plan, "router_logits_TE"):
        torch.testing.assert_close(plan.router_logits_TE, fp32_plan.router_logits_TE, atol=1e-6, rtol=0, msg=name)
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen), (name, seen)
    (y.float().sum() + layer.aux_loss).backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()


BF16 = ("trainer.precision=bf16-mixed", "trainer.accelerator=cpu", "trainer.limit_train_batches=2", "test=false")


def _finite_run(cfg, folder: Path) -> None:
    run(cfg)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["step"] == 2, metrics
    assert all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float)), metrics


@pytest.mark.parametrize("router", ROUTER_CONFIGS)
def test_bf16_mixed_trains_the_vit_with_every_router(tmp_path, router):
    fast = [o for o in VIT_FAST if not o.startswith("trainer.limit_train_batches")]
    _finite_run(compose_config(tmp_path, *fast, f"router={router}", *BF16), tmp_path)


@pytest.mark.parametrize("router", LM_ROUTERS)
def test_bf16_mixed_trains_the_lm_with_every_router_it_accepts(tmp_path, router):
    fast = [o for o in LM_FAST if not o.startswith("trainer.limit_train_batches")]
    _finite_run(compose_config(tmp_path, *fast, f"router={router}", *BF16), tmp_path)
