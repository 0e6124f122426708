"""ExpertUtilisation: histograms, scalars and the load heatmap, read back from real event files."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from moelab.callbacks.heatmap import heatmap_size
from moelab.callbacks.tags import (
    DEAD_EXPERTS,
    LOAD_HEATMAP_TAG,
    UTILISATION_SCALARS,
    aux_loss_tag,
    layer_scalar_tag,
    router_prob_share_tag,
    specialisation_tag,
    tokens_per_expert_tag,
)
from moelab.callbacks.utilisation import ExpertUtilisation, utilisation_scalars
from moelab.moe import ConfigError, TopKRouter
from moelab.run.train import run

from ..conftest import compose_config
from .events import load_events

BATCH, PATCHES, EXPERTS, K, STEPS, MOE_LAYERS = 16, 16, 8, 2, 4, (1, 3)


@pytest.fixture(scope="module")
def vit_events(tmp_path_factory):
    """One debug run of the default ViT (top-2, dropless, default callbacks): 4 steps, 2 val batches."""
    out = tmp_path_factory.mktemp("vit")
    # No warm-up: the collapse alarm judges from its end, and this run is 4 steps long.
    cfg = compose_config(
        out, "debug=default", f"data.batch_size={BATCH}", "callbacks.progress=null", "test=false", "task.warmup_steps=0"
    )
    run(cfg)
    return load_events(out / "tensorboard")


def test_histograms_for_every_moe_layer_sum_to_tokens_times_k(vit_events):
    for layer in MOE_LAYERS:
        steps = vit_events.Histograms(tokens_per_expert_tag(layer))
        assert [event.step for event in steps] == list(range(1, STEPS + 1))  # log_every_n_steps=1
        for event in steps:
            buckets = event.histogram_value.bucket
            assert len(buckets) == EXPERTS
            assert sum(buckets) == BATCH * PATCHES * K
        for event in vit_events.Histograms(router_prob_share_tag(layer)):
            assert sum(event.histogram_value.bucket) == pytest.approx(1.0, abs=1e-6)


def test_scalars_for_every_moe_layer(vit_events):
    """Every scalar is written for every layer, and the load scalars of each step are those of
    that step's tokens-per-expert histogram, worked out here (max and min over the mean, the
    population CV); dropless top-2 drops nothing and the router entropy lies in (0, ln E]."""
    scalars = set(vit_events.Tags()["scalars"])
    for layer in MOE_LAYERS:
        expected = [layer_scalar_tag(layer, name) for name in (*UTILISATION_SCALARS, DEAD_EXPERTS)]
        expected += [aux_loss_tag(layer, name) for name in ("balance", "zloss")]
        assert set(expected) <= scalars, set(expected) - scalars
        assert all(e.value == 0.0 for e in vit_events.Scalars(layer_scalar_tag(layer, "dropped_fraction")))
        assert all(e.value == 0.0 for e in vit_events.Scalars(layer_scalar_tag(layer, DEAD_EXPERTS)))
        assert all(0.0 < e.value <= math.log(EXPERTS) + 1e-6
                   for e in vit_events.Scalars(layer_scalar_tag(layer, "router_entropy")))
        load = {name: {e.step: e.value for e in vit_events.Scalars(layer_scalar_tag(layer, name))}
                for name in ("load_max_over_mean", "load_min_over_mean", "load_cv")}
        for event in vit_events.Histograms(tokens_per_expert_tag(layer)):
            counts = list(event.histogram_value.bucket)
            mean = sum(counts) / len(counts)
            cv = (sum((c - mean) ** 2 for c in counts) / len(counts)) ** 0.5 / mean
            assert load["load_max_over_mean"][event.step] == pytest.approx(max(counts) / mean, rel=1e-6)
            assert load["load_min_over_mean"][event.step] == pytest.approx(min(counts) / mean, rel=1e-6)
            assert load["load_cv"][event.step] == pytest.approx(cv, rel=1e-5)


def test_heatmap_images_have_the_expected_size(vit_events):
    images = set(vit_events.Tags()["images"])
    expected = {LOAD_HEATMAP_TAG: heatmap_size(len(MOE_LAYERS), EXPERTS)}
    for layer in MOE_LAYERS:
        expected[specialisation_tag(layer, "expert_class")] = heatmap_size(10, EXPERTS)
        expected[specialisation_tag(layer, "expert_position")] = heatmap_size(PATCHES, EXPERTS)
    assert set(expected) <= images
    for tag, (height, width) in expected.items():
        (event,) = vit_events.Images(tag)  # one validation
        assert (event.height, event.width) == (height, width), tag
        assert event.encoded_image_string.startswith(b"\x89PNG")


def test_utilisation_scalars_of_a_capacity_limited_plan():
    router = TopKRouter(d_model=8, num_experts=4, k=1, normalize=False, capacity_factor=0.5)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 10.0  # every token with x_0 > 0 wants expert 0
    x = torch.randn(64, 8).abs()
    values = utilisation_scalars(router(x))
    capacity = 8  # ⌈0.5 · 1 · 64 / 4⌉
    assert values["dropped_fraction"] == pytest.approx(1 - capacity / 64)
    assert values["load_max_over_mean"] == pytest.approx(4.0)
    assert values["load_min_over_mean"] == 0.0
    assert values["load_cv"] == pytest.approx(3**0.5)
    assert values["router_z"] > 0


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="every_n_steps=0 must be >= 1"):
        ExpertUtilisation(every_n_steps=0)


def tokens_per_expert_by_hand(plan) -> list[float]:
    """Tokens each expert processed, from what the plan says about each token or slot: a
    token-choice token's kept choices, counted one by one; an expert-choice row that is real;
    a Soft MoE slot (one row each); for SMEAR, the merge weights of the groups (sequences,
    segments or tokens), each counted once per token of its group."""
    num_experts = plan.num_experts
    counts = [0.0] * num_experts
    merge_GE = getattr(plan, "merge_GE", None)
    if merge_GE is not None:
        tokens_per_group = plan.num_tokens // merge_GE.shape[0]
        for weights in merge_GE.tolist():
            for e, w in enumerate(weights):
                counts[e] += w * tokens_per_group
    elif plan.selected_experts_TK is not None:
        kept = plan.kept_TK
        for t, choices in enumerate(plan.selected_experts_TK.tolist()):
            for k, e in enumerate(choices):
                counts[e] += 1.0 if kept is None or bool(kept[t, k]) else 0.0
    elif hasattr(plan, "dispatch_BMS"):
        sequences, slots = plan.dispatch_BMS.shape[0], plan.dispatch_BMS.shape[2]
        for slot in range(slots):
            counts[slot // (slots // num_experts)] += sequences
    else:
        valid = [True] * plan.token_index_N.numel() if plan.valid_N is None else plan.valid_N.tolist()
        for e, real in zip(plan.expert_index_N().tolist(), valid):
            counts[e] += float(real)
    return counts


def every_router_layer(path, experts: int = 4):
    """An MoE layer of conf/router/<path>'s router with its defaults, after one forward."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moelab.moe import GroupedExperts, MoELayer

    router = instantiate(OmegaConf.load(path))
    layer = MoELayer(16, 32, router, partial(GroupedExperts, num_experts=experts), layer_index=0,
                     router_facts={"vocab_size": 100})
    layer(torch.randn(2, 8, 16), token_ids=torch.randint(0, 100, (2, 8)))
    return layer


def test_statistics_exist_for_every_router_kind():
    """Every router's plan yields the utilisation numbers, and they are the numbers worked out
    here: load max/min over mean and CV from tokens per expert counted by hand, the router
    entropy as −Σ p log p by hand (rows renormalised), the probability share summing to 1.
    Soft MoE has no router logits, so no router_z."""
    from moelab.callbacks.utilisation import router_prob_share_E

    from ..conftest import CONF

    for path in sorted((CONF / "router").glob("*.yaml")):
        plan = every_router_layer(path).last_plan
        scalars = utilisation_scalars(plan)
        assert all(value == value for value in scalars.values()), path.stem  # no NaN
        assert ("router_z" in scalars) == (path.stem != "soft")
        torch.testing.assert_close(router_prob_share_E(plan).sum().item(), 1.0)
        counts = tokens_per_expert_by_hand(plan)
        mean = sum(counts) / len(counts)
        cv = (sum((c - mean) ** 2 for c in counts) / len(counts)) ** 0.5 / mean
        assert scalars["load_max_over_mean"] == pytest.approx(max(counts) / mean, rel=1e-5), path.stem
        assert scalars["load_min_over_mean"] == pytest.approx(min(counts) / mean, rel=1e-5, abs=1e-9), path.stem
        assert scalars["load_cv"] == pytest.approx(cv, rel=1e-4, abs=1e-6), path.stem
        entropy = 0.0
        for row in plan.router_probs_TE.tolist():
            total = sum(row)
            entropy -= sum(p / total * math.log(p / total) for p in row if p > 0)
        assert scalars["router_entropy"] == pytest.approx(entropy / plan.num_tokens, rel=1e-5, abs=1e-7), path.stem
