"""MaskMoE (router.token_mask=frequency): the rarest ids keep one fixed expert, masked
experts are never selected, the mask is fitted from the training split and checkpointed."""

from __future__ import annotations

import functools
from collections import Counter

import torch

import pytest

from moelab.moe import GroupedExperts, MoELayer, TopKRouter
from moelab.moe import routers as zoo
from moelab.moe.routed import moe_layers
from moelab.run.build import build

from ..conftest import LM_FAST, compose_config, one_line_error

COUNTS = torch.tensor([100, 1, 50, 2, 3, 80, 0, 0, 7, 9, 40, 11])


def masked_layer(k: int = 2, frequent_experts: int | None = None) -> MoELayer:
    torch.manual_seed(0)
    router = functools.partial(TopKRouter, k=k, token_mask="frequency", rare_share=0.5, frequent_experts=frequent_experts)
    layer = MoELayer(16, 32, router, functools.partial(GroupedExperts, num_experts=4, activation="swiglu"),
                     router_facts={"vocab_size": 12})
    layer.router.fit_token_mask(COUNTS)
    return layer


def test_the_rarest_half_of_seen_ids_and_the_unseen_get_one_expert_balanced_and_the_rest_all():
    allowed = masked_layer().router.allowed_VE
    # 10 ids occur: the 5 least frequent (counts 1, 2, 3, 7, 9) and the 2 that never occur are rare.
    rare = [1, 3, 4, 8, 9, 6, 7]
    assert torch.equal(allowed[rare].sum(1), torch.ones(7, dtype=torch.long))
    frequent = [i for i in range(12) if i not in rare]
    assert bool(allowed[frequent].all())
    # the seven rare ids spread over the 4 experts (no expert gets more than 2)
    assert allowed[rare].sum(0).max() <= 2


def test_frequent_ids_get_v_random_experts_fixed_by_the_seed():
    """MaskMoE's frequent tokens: V of the E experts each, drawn at random per id; the same
    draw for the same layer seed, different sets across ids."""
    allowed = masked_layer(frequent_experts=2).router.allowed_VE
    rare, frequent = [1, 3, 4, 8, 9, 6, 7], [0, 2, 5, 10, 11]
    assert torch.equal(allowed[frequent].sum(1), torch.full((5,), 2))
    assert torch.equal(allowed[rare].sum(1), torch.ones(7, dtype=torch.long))
    assert len({tuple(row.tolist()) for row in allowed[frequent]}) > 1  # not one set for every id
    assert torch.equal(masked_layer(frequent_experts=2).router.allowed_VE, allowed)
    layer = masked_layer(frequent_experts=2)
    ids = torch.tensor([[0, 2, 5, 10, 11] * 4])
    layer(torch.randn(1, 20, 16), token_ids=ids)
    assert bool(allowed[ids.reshape(-1)].gather(1, layer.last_plan.selected_experts_TK).all())
    with pytest.raises(Exception, match="router.frequent_experts=5 is the experts each frequent id may use"):
        masked_layer(frequent_experts=5)


def test_masked_experts_are_never_selected_and_rare_tokens_use_their_expert():
    layer = masked_layer()
    ids = torch.randint(0, 12, (3, 20))
    x = torch.randn(3, 20, 16)
    out = layer(x, token_ids=ids)
    plan = layer.last_plan
    allowed_TE = layer.router.allowed_VE[ids.reshape(-1)]
    kept = torch.ones_like(plan.selected_experts_TK, dtype=torch.bool) if plan.kept_TK is None else plan.kept_TK
    chosen_allowed = allowed_TE.gather(1, plan.selected_experts_TK)
    assert bool((chosen_allowed | ~kept).all())  # a processed choice is always an allowed expert
    assert bool((plan.router_probs_TE[~allowed_TE] == 0).all())
    counted = torch.zeros(4, dtype=torch.long).scatter_add_(0, plan.selected_experts_TK[kept], torch.ones_like(plan.selected_experts_TK[kept]))
    assert torch.equal(plan.tokens_per_expert_E, counted)
    # A rare token's output is its one expert's output (weight 1).
    rare = [t for t, i in enumerate(ids.reshape(-1).tolist()) if layer.router.allowed_VE[i].sum() == 1]
    t = rare[0]
    e = int(layer.router.allowed_VE[ids.reshape(-1)[t]].nonzero())
    x_t = x.reshape(-1, 16)[t : t + 1]
    expected = layer.experts(x_t, torch.nn.functional.one_hot(torch.tensor(e), 4))
    torch.testing.assert_close(out.reshape(-1, 16)[t], expected[0], atol=1e-5, rtol=1e-4)
    assert "router.allowed_VE" in layer.state_dict()


TOKEN_CHOICE = {
    "topk": functools.partial(zoo.TopKRouter, k=2),
    "switch": functools.partial(zoo.TopKRouter, k=1, normalize=False, capacity_factor=1.25),
    "gshard": functools.partial(zoo.GShardRouter, k=2),
    "noisy_topk": functools.partial(zoo.NoisyTopKRouter, k=2),
    "cosine": functools.partial(zoo.CosineRouter, k=2),
    "aux_free": functools.partial(zoo.AuxFreeRouter, k=2),
    "sinkhorn": functools.partial(zoo.SinkhornRouter, k=1),
}


@pytest.mark.parametrize("name", sorted(TOKEN_CHOICE))
def test_every_token_choice_router_takes_the_mask(name):
    torch.manual_seed(0)
    router = functools.partial(TOKEN_CHOICE[name], token_mask="frequency", rare_share=0.5)
    losses = {"balance": 0.01, "zloss": 0.001, "load": 0.01, "importance": 0.01}
    supported = TOKEN_CHOICE[name].func.supported_losses
    layer = MoELayer(16, 32, router, functools.partial(GroupedExperts, num_experts=4, activation="swiglu"),
                     router_facts={"vocab_size": 12}, aux_loss_weights={k: v for k, v in losses.items() if k in supported})
    layer.router.fit_token_mask(COUNTS)
    if name == "noisy_topk":  # its gates start at zero: give the noise and the logits something to work with
        torch.nn.init.normal_(layer.router.gate.weight)
        torch.nn.init.normal_(layer.router.noise.weight)
    ids = torch.randint(0, 12, (4, 24))
    x = torch.randn(4, 24, 16, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        out = layer(x, token_ids=ids)
        plan = layer.last_plan
        allowed_TE = layer.router.allowed_VE[ids.reshape(-1)]
        chosen_allowed = allowed_TE.gather(1, plan.selected_experts_TK)
        kept = torch.ones_like(chosen_allowed) if plan.kept_TK is None else plan.kept_TK
        assert bool((chosen_allowed | ~kept).all()), name  # masked experts are never processed
        assert bool((plan.router_probs_TE[~allowed_TE] == 0).all()), name
        assert torch.isfinite(out).all() and all(torch.isfinite(v).all() for v in layer.aux_losses.values()), name
    assert len(layer.aux_losses) >= 2
    (out.sum() + layer.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())
    if name == "aux_free":  # masked choices are not counted as load for the bias update
        layer.train()
        layer.router.load_since_update_E.zero_()
        layer(x, token_ids=ids)
        assert layer.router.load_since_update_E.sum() == layer.last_plan.tokens_per_expert_E.sum()


def test_the_language_task_fits_the_mask_from_the_training_split(tmp_path):
    """The byte counts of the training split, counted here one byte at a time (not with the
    datamodule's `token_counts`, which the task calls): the mask's rare ids are the unseen
    and the rarer half of the seen. Fitted on the validation split, it would not match."""
    cfg = compose_config(tmp_path, *LM_FAST, "router.token_mask=frequency", "trainer.limit_train_batches=1",
                         "trainer.limit_val_batches=0")
    datamodule, task, trainer = build(cfg)
    trainer.fit(task, datamodule=datamodule)  # one step: the mask is fitted when the fit sets up
    counted = Counter(datamodule.tokens["train"].tolist())
    router = moe_layers(task.model)[0].router
    single = router.allowed_VE.sum(1) == 1
    full = torch.tensor([counted[i] for i in range(256)], dtype=torch.float64)
    seen = int((full > 0).sum())
    assert 60 < seen < 200  # Python source uses some of the 256 byte values
    assert int(single.sum()) == 256 - seen + round(seen / 2)  # the unseen and the rarer half of the seen
    assert full[single].max() <= full[~single].min()  # the rare ones are the least frequent


def test_images_have_no_token_ids_for_a_mask(tmp_path):
    line = one_line_error(compose_config(tmp_path, "debug=default", "router.token_mask=frequency"))
    assert "router.token_mask masks experts per token id: use it with the language model" in line


def test_a_router_without_a_mask_refuses_one_in_one_line(tmp_path):
    cfg = compose_config(tmp_path, *LM_FAST, "router=expert_choice", "+router.token_mask=frequency")
    assert one_line_error(cfg) == ("moelab: error: router.token_mask is not a setting of ExpertChoiceRouter: drop it, "
                                   "or pick a router that has it (conf/router/)")
