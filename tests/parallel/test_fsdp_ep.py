"""FSDP2 + expert parallelism on CPU with gloo: numerics against one process, resharding checkpoints."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from moelab.moe import ConfigError
from moelab.parallel.checkpoint import load_sharded_into
from moelab.parallel.fsdp_ep import check_ep

from . import workers

# Sharded runs add partial sums in another order; fp32 on CPU agrees to ~1e-7.
TOLERANCE = dict(atol=2e-5, rtol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int, *args) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, *args[:1], port, *args[1:])) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """2 ranks, ep=2: every router's step, plus a saved checkpoint of the topk model."""
    tmp = tmp_path_factory.mktemp("ep2")
    out, checkpoint = tmp / "results.pt", tmp / "checkpoint"
    spawn(workers.numerics_worker, 2, 2, str(out), str(checkpoint))
    return torch.load(out, weights_only=False), checkpoint


@pytest.fixture(scope="module")
def dp2_ep2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2ep2") / "results.pt"
    spawn(workers.numerics_worker, 4, 2, str(out), None)
    return torch.load(out, weights_only=False)


def check_against_single_process(results: dict, world: int) -> None:
    for router in workers.ROUTERS:
        loss, grads = results[router]
        want_loss, want_grads = workers.reference(router, world)
        assert loss == pytest.approx(want_loss, rel=1e-5), router
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], **TOLERANCE, msg=f"{router}: {name}")


def test_two_ranks_ep2_match_one_process_for_every_router(ep2_run):
    check_against_single_process(ep2_run[0], world=2)


def test_four_ranks_dp2_ep2_match_one_process_for_every_router(dp2_ep2_run):
    check_against_single_process(dp2_ep2_run, world=4)


def test_bf16_parameters_compute_in_bf16_and_keep_fp32_master_weights(ep2_run):
    """trainer.strategy.param_dtype=bf16 (FSDP2's MixedPrecisionPolicy): dense and expert weights
    are gathered as bf16 for the forward, the sharded weights and gradients stay fp32, and
    the loss is the fp32 one to bf16's precision."""
    bf16 = ep2_run[0]["bf16"]
    assert bf16["forward"] == {"dense": torch.bfloat16, "experts": torch.bfloat16}
    assert bf16["master"] == bf16["grads"] == {torch.float32}
    assert bf16["loss"] == pytest.approx(workers.reference("topk", 2)[0], rel=2e-2)


def test_expert_bytes_fall_by_ep(ep2_run, dp2_ep2_run):
    full_bytes = sum(w.numel() * 4 for w in workers.make_model("topk").moe.experts.expert_weights().values())
    # ep=2 splits the expert stacks (weights and biases) in two; FSDP then halves them again over dp=2.
    assert ep2_run[0]["expert_bytes"] == full_bytes // 2
    assert dp2_ep2_run["expert_bytes"] == full_bytes // 4


@pytest.mark.parametrize("world,ep", [(4, 4), (2, 1)])
def test_ep2_checkpoint_loads_into_other_layouts(ep2_run, tmp_path, world, ep):
    results, checkpoint = ep2_run
    out = tmp_path / "outputs.pt"
    spawn(workers.load_worker, world, ep, str(out), str(checkpoint))
    torch.testing.assert_close(torch.load(out), results["outputs"], **TOLERANCE)


def test_ep2_checkpoint_loads_into_one_process(ep2_run):
    results, checkpoint = ep2_run
    model = load_sharded_into(workers.make_model("topk", seed=123), checkpoint)
    x, ids = workers.global_batch()
    outputs = torch.cat([model(xc, ic) for xc, ic in zip(x.chunk(2), ids.chunk(2))])
    torch.testing.assert_close(outputs.detach(), results["outputs"], **TOLERANCE)


@pytest.mark.parametrize(
    "world,ep,experts,message",
    [
        (4, 3, None, "ep=3 must divide the number of processes \\(4\\)"),
        (4, 2, 5, "experts=5 is not divisible by ep=2"),
    ],
)
def test_ep_errors(world, ep, experts, message):
    with pytest.raises(ConfigError, match=message):
        check_ep(world, ep, experts)
