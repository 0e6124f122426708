"""The decoder LM: RMSNorm and RoPE against their equations, shapes, placement, and causal safety
for every router config in conf/router/ (routers merged later are covered automatically)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from moelab.models.build import build_model as model_of
from moelab.models.lm import MoELM, RMSNorm, apply_rope, rope_angles
from moelab.moe import ConfigError, GroupedExperts, MoELayer, TopKRouter

from ..conftest import CONF, compose_config

ROUTER_CONFIGS = sorted(p.stem for p in (CONF / "router").glob("*.yaml"))
VOCAB = 256


def tiny_lm(router=None, expert=None, **kwargs) -> MoELM:
    router = router or functools.partial(TopKRouter, num_experts=4, k=2)
    expert = expert or functools.partial(GroupedExperts, num_experts=4, activation="swiglu")
    options = dict(vocab_size=VOCAB, d_model=32, depth=2, num_heads=2, ffn_hidden=64, moe_every=1)
    options.update(kwargs)
    return MoELM(router, expert, {"balance": 0.01}, **options)


def test_rmsnorm_follows_zhang_sennrich():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    for row, out in zip(x, norm(x)):
        rms = math.sqrt(sum(v * v for v in row.tolist()) / 6 + 1e-6)
        expected = torch.tensor([v / rms * g for v, g in zip(row.tolist(), range(1, 7))])
        torch.testing.assert_close(out, expected)


def test_rope_is_a_rotation_by_position_times_frequency():
    """Written the second way: pairs as complex numbers multiplied by e^{i m θ_j}."""
    head_dim, seq_len = 8, 5
    x = torch.randn(2, 3, seq_len, head_dim)
    cos, sin = rope_angles(seq_len, head_dim, base=100.0)
    out = apply_rope(x, cos, sin)
    for m in range(seq_len):
        for j in range(head_dim // 2):
            theta = 100.0 ** (-2 * j / head_dim)
            rotated = torch.complex(x[..., m, 2 * j], x[..., m, 2 * j + 1]) * complex(math.cos(m * theta), math.sin(m * theta))
            torch.testing.assert_close(out[..., m, 2 * j], rotated.real, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[..., m, 2 * j + 1], rotated.imag, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    cos, sin = rope_angles(32, head_dim)

    def score(m: int, n: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, -1), cos[m : m + 1], sin[m : m + 1])
        rk = apply_rope(k.view(1, 1, 1, -1), cos[n : n + 1], sin[n : n + 1])
        return (rq * rk).sum()

    torch.testing.assert_close(score(3, 1), score(20, 18), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_shapes_placement_tying_and_equal_active_ffn():
    moe = tiny_lm(depth=4, moe_every=2)
    dense = tiny_lm(depth=4, moe_every=0)
    assert moe(torch.randint(0, VOCAB, (3, 7))).shape == (3, 7, VOCAB)
    assert [i for i, b in enumerate(moe.blocks) if isinstance(b.ffn, MoELayer)] == [1, 3]
    assert not any(isinstance(b.ffn, MoELayer) for b in dense.blocks)
    assert moe.head.weight is moe.embed.weight
    assert tiny_lm(tie_embeddings=False).head.weight is not tiny_lm(tie_embeddings=False).embed.weight
    # top-2 over experts of ffn_hidden/2 units: the dense FFN's active parameters (FLOPs),
    # up to the router's gate matrix.
    gates = sum(b.ffn.router.gate.weight.numel() for b in moe.blocks if isinstance(b.ffn, MoELayer))
    assert moe.num_parameters(active=True) - gates == dense.num_parameters()
    assert moe.blocks[1].ffn.experts.hidden == 32


def test_generate_is_deterministic_for_a_fixed_generator():
    model = tiny_lm().eval()
    prompt = torch.randint(0, VOCAB, (1, 5))
    first = model.generate(prompt, 6, generator=torch.Generator().manual_seed(1))
    second = model.generate(prompt, 6, generator=torch.Generator().manual_seed(1))
    assert first.shape == (1, 11) and torch.equal(first, second) and torch.equal(first[:, :5], prompt)


def _router_and_expert(tmp_path: Path, router_name: str):
    cfg = compose_config(tmp_path, "experiment=lm_pystdlib", f"router={router_name}", "experts=4")
    return instantiate(cfg.router), instantiate(cfg.expert)


def _logits(model: MoELM, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # routers with noise (training) draw the same noise for both inputs
    return model(tokens)


@pytest.mark.parametrize("router_name", ROUTER_CONFIGS)
def test_router_configs_are_causal_safe_or_refused(tmp_path, router_name):
    router, expert = _router_and_expert(tmp_path, router_name)
    try:
        model = tiny_lm(router, expert, moe_every=1)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and "future tokens would leak" in message and "router=topk" in message
        assert not MoELayer(16, 16, router=router, experts=expert).causal_safe
        return
    assert all(b.ffn.causal_safe for b in model.blocks)
    for mode in ("train", "eval"):
        future_leaks, past_matters = causal_probe(model, train=mode == "train")
        assert not future_leaks, f"{router_name} ({mode}): tokens after t changed the logits at positions <= t"
        assert past_matters, mode  # not vacuous: logits do depend on the tokens they may see


def causal_probe(model: MoELM, train: bool, t: int = 5, seq_len: int = 12) -> tuple[bool, bool]:
    """(changing tokens t+1.. changes logits at <= t, changing token t changes logits at t)."""
    model.train(train)
    tokens = torch.randint(0, VOCAB, (3, seq_len))
    changed_future = tokens.clone()
    changed_future[:, t + 1 :] = torch.randint(0, VOCAB, (3, seq_len - t - 1))
    changed_past = tokens.clone()
    changed_past[:, t] = (tokens[:, t] + 1) % VOCAB
    with torch.no_grad():
        reference = _logits(model, tokens, seed=0)
        future = _logits(model, changed_future, seed=0)
        past = _logits(model, changed_past, seed=0)
    future_leaks = not torch.allclose(future[:, : t + 1], reference[:, : t + 1], atol=1e-5, rtol=1e-4)
    return future_leaks, not torch.allclose(past[:, t], reference[:, t], atol=1e-4)


class SequenceMeanRouter(TopKRouter):
    """A deliberately leaky router (adds the batch mean to every token) that claims to be safe."""

    causal_safe = True

    def forward(self, x_TD, context=None):
        return super().forward(x_TD + x_TD.mean(0, keepdim=True), context)


def test_the_probe_catches_a_router_that_mixes_positions():
    model = tiny_lm(functools.partial(SequenceMeanRouter, num_experts=4, k=2))
    assert causal_probe(model, train=False)[0] and causal_probe(model, train=True)[0]


def test_switch_with_capacity_is_refused_in_one_line(tmp_path):
    router, expert = _router_and_expert(tmp_path, "switch")
    with pytest.raises(ConfigError) as info:
        tiny_lm(router, expert)
    message = str(info.value)
    assert "\n" not in message
    assert "future tokens would leak into earlier positions" in message
    assert "router=topk without capacity_factor" in message


def test_dense_model_accepts_any_router_since_none_is_built(tmp_path):
    router, expert = _router_and_expert(tmp_path, "switch")
    assert not any(isinstance(b.ffn, MoELayer) for b in tiny_lm(router, expert, moe_every=0).blocks)


def test_lm_small_gpu_is_gpt2_small_sized_with_dense_active_flops(tmp_path):
    def build(*overrides: str) -> MoELM:
        cfg = compose_config(tmp_path, "experiment=lm_small_gpu", *overrides)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.optimized_metric == "val/bpb"
        with torch.device("meta"):  # shapes only: no memory, no init cost
            return model_of(cfg)

    moe, dense = build(), build("model.moe_every=0")
    gates = sum(b.ffn.router.gate.weight.numel() for b in moe.blocks if isinstance(b.ffn, MoELayer))
    assert 100e6 < moe.num_parameters(active=True) < 130e6 and moe.num_parameters() > 200e6
    assert moe.num_parameters(active=True) - gates == dense.num_parameters()


def test_the_loss_with_targets_is_the_logits_cross_entropy_with_the_same_gradients():
    """MoELM(ids, targets) computes the head in row chunks (moelab.models.linear_cross_entropy):
    the same loss and gradients as the cross-entropy of MoELM(ids), the head tied to the
    embedding (whose gradient then gathers both uses)."""
    torch.manual_seed(0)
    model = tiny_lm()
    ids, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    model(ids, targets).backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    assert model.head.weight is model.embed.weight
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_nucleus_keeps_the_fewest_likeliest_tokens_reaching_p():
    """Written out: sort by probability, keep tokens while the mass before them is under p."""
    from moelab.models.lm import nucleus

    torch.manual_seed(3)
    logits = torch.randn(4, 12)
    for p in (0.05, 0.5, 0.9, 1.0):
        kept = torch.isfinite(nucleus(logits, p))
        for row in range(4):
            probs = logits[row].softmax(-1).tolist()
            order = sorted(range(12), key=lambda i: -probs[i])
            expected, mass = set(), 0.0
            for i in order:
                if mass >= p:
                    break
                expected.add(i)
                mass += probs[i]
            assert set(kept[row].nonzero().flatten().tolist()) == expected, (p, row)
    model = tiny_lm().eval()
    prompt = torch.randint(0, VOCAB, (1, 5))
    greedy = model.generate(prompt, 4, temperature=0.0)
    tiny_p = model.generate(prompt, 4, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_p, greedy)  # a nucleus of one token: the likeliest, as greedy picks
