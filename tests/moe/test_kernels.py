"""The Triton kernel of the experts' first half (moelab.moe.kernels) against the torch path:
the tile map covers every row once, and the kernel's output and its gradients (tokens, gate
and up weights) equal the torch formulation written out here; an MoE layer with
`kernel="triton"` equals the same layer on the torch path. On a GPU the kernel runs natively,
in fp32 and bf16. Without one it runs in Triton's interpreter (fp32: the interpreter's bf16
`tl.dot` is not exact), which must be on before Triton is first imported: the suite runs
this file again in a fresh process with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moelab.moe import ConfigError, GroupedExperts, MoELayer, TopKRouter, kernels

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"  # the kernel can run in this process


@pytest.mark.skipif(HERE, reason="the kernel runs in this process")
def test_the_kernel_checks_pass_in_triton_s_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "not interpreter"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


kernel_test = pytest.mark.skipif(not HERE, reason="runs in the interpreter's process (the test above)")


@kernel_test
def test_the_tile_map_covers_every_row_once_without_straddling_experts():
    sizes = torch.tensor([0, 5, 64, 65, 0, 130, 1])
    expert, start, row_end = kernels.tile_map(sizes, int(sizes.sum()), block_m=64)
    covered = []
    for e, s in zip(expert.tolist(), start.tolist()):
        if e < 0:
            continue
        end = int(row_end[e])
        assert int(row_end[e] - sizes[e]) <= s < end  # inside expert e's rows
        covered += list(range(s, min(s + 64, end)))
    assert sorted(covered) == list(range(int(sizes.sum())))
    assert len(expert) == -(-int(sizes.sum()) // 64) + len(sizes)  # the static upper bound


def reference(x, token_index, sizes, w1, w3, activation):
    xg = x[token_index]
    out, start = [], 0
    for e, size in enumerate(sizes.tolist()):
        rows = xg[start:start + size]
        h1, h3 = rows @ w1[e], rows @ w3[e]
        out.append((F.silu(h1) if activation == "swiglu" else F.gelu(h1)) * h3)
        start += size
    return torch.cat(out)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_the_kernel_and_its_gradients_equal_the_torch_formulation(activation, dtype):
    torch.manual_seed(0)
    T, D, Fh, E = 40, 48, 72, 5
    sizes = torch.tensor([17, 0, 33, 9, 21], device=DEVICE)  # an empty expert; rows not a multiple of the tile
    token_index = torch.randint(0, T, (int(sizes.sum()),), device=DEVICE)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    w1 = torch.randn(E, D, Fh, device=DEVICE, requires_grad=True)
    w3 = torch.randn(E, D, Fh, device=DEVICE, requires_grad=True)
    out = kernels.gather_gate_up(x, token_index, sizes, w1, w3, activation)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = (out.detach(), x.grad, w1.grad, w3.grad)
    x.grad = w1.grad = w3.grad = None
    expected = reference(x, token_index, sizes, w1.to(dtype), w3.to(dtype), activation)
    expected.backward(grad)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for name, a, b in zip(("a", "x.grad", "w1.grad", "w3.grad"), got, (expected.detach(), x.grad, w1.grad, w3.grad)):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tolerance, msg=name)


@kernel_test
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_an_moe_layer_on_the_kernel_equals_the_torch_path(capacity):
    def layer(kernel):
        torch.manual_seed(0)
        experts = partial(GroupedExperts, num_experts=4, activation="swiglu", kernel=kernel)
        router = partial(TopKRouter, k=2, capacity_factor=capacity)
        return MoELayer(32, 48, router, experts, {"balance": 0.01}).to(DEVICE)

    x = torch.randn(3, 10, 32, device=DEVICE)
    results = []
    for kernel in ("torch", "triton"):
        moe, x_in = layer(kernel), x.clone().requires_grad_()
        y = moe(x_in)
        (y.square().mean() + moe.aux_loss).backward()
        results.append((y.detach(), x_in.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_kernel_setting_is_checked():
    with pytest.raises(ConfigError, match="expert.kernel=triton fuses the gate and up matmuls of SwiGLU and GeGLU"):
        GroupedExperts(16, 32, 4, activation="gelu", kernel="triton")
    with pytest.raises(ConfigError, match="expert.kernel=cuda must be torch or triton"):
        GroupedExperts(16, 32, 4, activation="swiglu", kernel="cuda")
