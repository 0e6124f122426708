"""Sparse upcycling: an MoE model built from its dense twin computes the dense model at
step 0 (copies, normalised routers), the split construction is right in expectation, and
`init_from` + `model.upcycle=true` works from train.py with one-line refusals."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from moelab.models.lm import MoELM
from moelab.models.vit import MoEViT
from moelab.moe import ConfigError, GroupedExperts, TopKRouter
from moelab.moe.experts import DenseFFN
from moelab.moe.lifecycle.upcycle import upcycle_model
from moelab.run.train import run

from ..conftest import LM_FAST, compose_config, one_line_error

LM_SIZE = dict(vocab_size=64, d_model=32, depth=2, num_heads=2, ffn_hidden=64)


def lm(moe_every: int, experts: int = 4, k: int = 2, activation: str = "swiglu", **expert_options) -> MoELM:
    router = functools.partial(TopKRouter, num_experts=experts, k=k)
    expert = functools.partial(GroupedExperts, num_experts=experts, activation=activation, **expert_options)
    return MoELM(router, expert, {"balance": 0.01}, moe_every=moe_every, expert_hidden="dense", **LM_SIZE)


def vit(moe_every: int, bias: bool = True) -> MoEViT:
    router = functools.partial(TopKRouter, num_experts=4, k=2)
    expert = functools.partial(GroupedExperts, num_experts=4, activation="gelu", bias=bias)
    return MoEViT(router, expert, {}, moe_every=moe_every, expert_hidden="dense")


def test_grouped_and_dense_biases_follow_their_definition():
    torch.manual_seed(0)
    experts = GroupedExperts(d_model=8, hidden=16, num_experts=3, activation="swiglu", bias=True)
    for b in (experts.b1_EF, experts.b3_EF, experts.b2_ED):
        torch.nn.init.normal_(b)
    sizes = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8)
    rows = [0, 0, 2, 2, 2]
    expected = torch.stack([
        (F.silu(x[n] @ experts.w1_EDF[e] + experts.b1_EF[e]) * (x[n] @ experts.w3_EDF[e] + experts.b3_EF[e]))
        @ experts.w2_EFD[e] + experts.b2_ED[e]
        for n, e in enumerate(rows)
    ])
    torch.testing.assert_close(experts(x, sizes), expected)
    ffn = DenseFFN(8, 16, "gelu", bias=True)
    torch.nn.init.normal_(ffn.b1_H), torch.nn.init.normal_(ffn.b2_D)
    torch.testing.assert_close(ffn(x), F.gelu(x @ ffn.w1_DH + ffn.b1_H) @ ffn.w2_HD + ffn.b2_D)


@pytest.mark.parametrize("shared, k", [(0, 2), (1, 3)])  # k·m − s = 2 routed experts either way
def test_upcycled_lm_computes_the_dense_lm(shared, k):
    torch.manual_seed(0)
    dense = lm(moe_every=0)
    moe = lm(moe_every=1, k=k, num_shared=shared)
    upcycle_model(moe, dense.state_dict())
    tokens = torch.randint(0, 64, (3, 16))
    dense.eval(), moe.eval()
    logits_dense, logits_moe = dense(tokens), moe(tokens)
    torch.testing.assert_close(logits_moe, logits_dense, atol=1e-5, rtol=1e-4)
    loss = lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())  # noqa: E731
    assert abs(loss(logits_moe).item() - loss(logits_dense).item()) < 1e-4
    # The router starts small and random (std 0.02); every expert is the dense FFN of its block.
    layer = moe.blocks[1].ffn
    assert 0.01 < layer.router.gate.weight.std().item() < 0.03
    torch.testing.assert_close(layer.experts.w1_EDF[3], dense.blocks[1].ffn.w1_DH)


def test_upcycled_vit_with_biases_computes_the_dense_vit():
    torch.manual_seed(0)
    dense = vit(moe_every=0)
    moe = vit(moe_every=2)
    upcycle_model(moe, dense.state_dict())
    images = torch.randn(4, 1, 8, 8)
    dense.eval(), moe.eval()
    torch.testing.assert_close(moe(images), dense(images), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="expert.bias=true"):
        upcycle_model(vit(moe_every=2, bias=False), dense.state_dict())


def test_a_fine_grained_split_gives_the_dense_ffn_in_expectation():
    """DeepSeekMoE (granularity 4, one shared expert): the shared expert takes slice 0 and
    the routed fine experts slices 1..3 scaled by 3, so shared(x) plus the mean over fine
    experts — what uniform routing gives on average — equals the dense FFN."""
    torch.manual_seed(0)
    dense = lm(moe_every=0)
    moe = lm(moe_every=1, granularity=4, num_shared=1)
    upcycle_model(moe, dense.state_dict())
    layer, ffn = moe.blocks[0].ffn, dense.blocks[0].ffn
    x = torch.randn(6, 32)
    E = layer.experts.num_experts
    every_expert = torch.stack([layer.experts(x, F.one_hot(torch.tensor(e), E) * 6) for e in range(E)])
    torch.testing.assert_close(layer.shared_experts(x) + every_expert.mean(0), ffn(x), atol=1e-5, rtol=1e-4)


def test_upcycled_routers_spread_the_tokens_at_step_0():
    """A zero router ties every logit and top-k breaks the tie the same way for every token:
    all tokens on the same 2 experts. The default small random router spreads them over
    every expert."""
    torch.manual_seed(0)
    dense = lm(moe_every=0)
    tokens = torch.randint(0, 64, (8, 32))
    for std in (0.0, 0.02):
        moe = lm(moe_every=1, experts=8)
        upcycle_model(moe, dense.state_dict(), router_std=std) if std == 0.0 else upcycle_model(moe, dense.state_dict())
        moe.eval()(tokens)
        loads = torch.stack([block.ffn.last_plan.tokens_per_expert_E for block in moe.blocks])
        if std == 0.0:
            assert ((loads == tokens.numel()).sum(1) == 2).all() and ((loads == 0).sum(1) == 6).all(), loads
        else:
            assert (loads > 0).all(), loads  # every expert of every layer gets tokens
            assert (loads.max(1).values < 0.5 * tokens.numel()).all(), loads


def test_upcycling_refuses_what_it_cannot_build():
    dense = lm(moe_every=0)
    with pytest.raises(ConfigError, match="gated"):
        upcycle_model(lm(moe_every=1, activation="gelu"), dense.state_dict())
    with pytest.raises(ConfigError, match="an MoE model"):
        upcycle_model(lm(moe_every=1), lm(moe_every=1).state_dict())
    with pytest.raises(ConfigError, match="no MoE layers|has none"):
        upcycle_model(lm(moe_every=0), dense.state_dict())
    wider = MoELM(functools.partial(TopKRouter, num_experts=4, k=2), functools.partial(GroupedExperts, num_experts=4,
                  activation="swiglu"), {}, moe_every=1, expert_hidden="dense", **{**LM_SIZE, "d_model": 64})
    with pytest.raises(ConfigError, match="not the same backbone|not this model's dense twin"):
        upcycle_model(wider, dense.state_dict())




def test_train_py_upcycles_a_dense_checkpoint(tmp_path, caplog):
    run(compose_config(tmp_path / "dense", *LM_FAST, "model.moe_every=0"))
    caplog.set_level(logging.INFO, logger="moelab.run.train")
    dense_ckpt = tmp_path / "dense" / "checkpoints" / "last.ckpt"
    run(compose_config(tmp_path / "moe", *LM_FAST, "model.expert_hidden=dense", f"init_from={dense_ckpt}", "model.upcycle=true",
                       "task.lr=1e-7"))  # three steps that barely move the weights
    moe = torch.load(tmp_path / "moe" / "checkpoints" / "last.ckpt", weights_only=True)
    dense = torch.load(dense_ckpt, weights_only=True)["state_dict"]
    assert moe["global_step"] == 3  # a new run: its own steps from 0, not the dense run's
    # Every expert is (up to three tiny steps) the dense FFN it copied.
    w2_dense = dense["model.blocks.1.ffn.w2_HD"]
    for e in range(8):
        drift = (moe["state_dict"]["model.blocks.1.ffn.experts.w2_EFD"][e] - w2_dense).abs().max()
        assert drift < 1e-5, e
    drift = (moe["state_dict"]["model.embed.weight"] - dense["model.embed.weight"]).abs().max()
    assert drift < 1e-5
    assert "Upcycled 1 MoE layer (blocks.1.ffn)" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("model.upcycle=true", "model.upcycle=true builds the experts from a dense checkpoint: add init_from="),
    ("init_from=/no/such.ckpt", "init_from=/no/such.ckpt does not exist"),
])
def test_upcycling_config_mistakes_are_one_line(tmp_path, override, message):
    assert message in one_line_error(compose_config(tmp_path, *LM_FAST, override))
