"""Every router config trains the ViT on real digits batches, with gradients everywhere."""

from pathlib import Path

import pytest
import torch

from moelab.data.digits import DigitsDataModule
from moelab.models.build import build_model as model_of
from moelab.moe import ConfigError, collect_aux_losses
from moelab.moe.routed import after_optimizer_step

from ..conftest import CONF, compose_config

ROUTERS = sorted(p.stem for p in (CONF / "router").glob("*.yaml"))


@pytest.fixture(scope="module")
def digits_batches():
    data = DigitsDataModule(batch_size=32)
    data.setup()
    return [batch for _, batch in zip(range(4), data.train_dataloader())]


def build_model(tmp_path: Path, *overrides: str):
    cfg = compose_config(tmp_path, "model.embed_dim=32", "model.depth=2", "model.moe_every=1", *overrides)
    return model_of(cfg)


@pytest.mark.parametrize("router", ROUTERS)
def test_router_trains_vit_without_nan_and_every_parameter_learns(router, tmp_path, digits_batches):
    overrides = [f"router={router}"]  # hash: the key defaults to the patch position on images
    torch.manual_seed(0)
    model = build_model(tmp_path, *overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, (images, labels) in enumerate(digits_batches):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        aux, _ = collect_aux_losses(model)
        if aux is not None:
            loss = loss + aux
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert silent == [], f"no gradient reached {silent}"
        optimizer.step()
        after_optimizer_step(model)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_hash_by_token_id_is_refused_on_images(tmp_path):
    with pytest.raises(Exception, match="router.key=position") as info:  # Hydra wraps it
        build_model(tmp_path, "router=hash", "router.key=token_id")
    assert isinstance(info.value.__cause__ or info.value, ConfigError)


def test_deepseek_experts_compose(tmp_path):
    model = build_model(tmp_path, "expert=deepseek", "experts=4", "router.k=1", "router.normalize=false")
    layer = model.vit.blocks[0].mlp
    # k·m − shared = 1·4 − 1 routed fine experts (DeepSeekMoE), 4 active with the shared one.
    assert (layer.num_experts, layer.router.k, layer.experts.num_shared) == (16, 3, 1)
