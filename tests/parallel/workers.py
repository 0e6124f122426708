"""Process bodies for the multi-rank tests (importable by spawned processes)."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from moelab.moe import GroupedExperts, MoELayer

CONF = Path(__file__).resolve().parents[2] / "conf"
# Every router that splits over ep ranks: smear merges every expert on every rank, so it
# refuses ep > 1 (tests/moe/test_smear.py checks the one-line refusal).
ROUTERS = sorted(p.stem for p in (CONF / "router").glob("*.yaml") if p.stem != "smear")
D, EXPERTS, B, L, VOCAB = 16, 4, 8, 6, 50  # B sequences of L tokens (ids < VOCAB) in the global batch
LOSSES = {"balance": 0.01, "zloss": 0.001}


class TinyMoE(nn.Module):
    """A projection and one MoE layer (with a shared expert): dense and expert weights both."""

    def __init__(self, router: str) -> None:
        super().__init__()
        config = OmegaConf.load(CONF / "router" / f"{router}.yaml")
        # A shared expert beside routers without k; with a k it would take one of the k
        # routed slots (DeepSeekMoE), leaving top-1 for routers that need k >= 2.
        shared = 0 if "k" in config else 1
        self.proj = nn.Linear(D, D)
        # Expert biases too: their (E, F) stacks are split by expert like the weights.
        experts = partial(GroupedExperts, num_experts=EXPERTS, num_shared=shared, bias=True)
        self.moe = MoELayer(D, 32, instantiate(config), experts, LOSSES, router_facts={"vocab_size": VOCAB})

    def forward(self, x_BLD: torch.Tensor, ids_BL: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x_BLD), token_ids=ids_BL)


def make_model(router: str, seed: int = 0) -> TinyMoE:
    torch.manual_seed(seed)
    return TinyMoE(router)


def forward_loss(model: TinyMoE, x_BLD: torch.Tensor, ids_BL: torch.Tensor, noise_seed: int) -> torch.Tensor:
    torch.manual_seed(noise_seed)  # routers that draw noise draw the same noise per chunk
    return model(x_BLD, ids_BL).square().mean() + model.moe.aux_loss


def global_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=generator), torch.randint(0, VOCAB, (B, L), generator=generator)


def reference(router: str, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the same global batch split into the ranks' chunks: mean loss, grads."""
    model = make_model(router)
    x, ids = global_batch()
    losses = [forward_loss(model, xc, ic, 100 + r) for r, (xc, ic) in enumerate(zip(x.chunk(world), ids.chunk(world)))]
    loss = sum(losses) / world
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def finish() -> None:
    """Leave the process group and exit at once: the results are saved, and an ordinary
    interpreter exit sometimes aborts in gloo's thread teardown ("terminate called without an
    active exception", seen with torch 2.14 on 2 cores), which would fail the exit-code check."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def numerics_worker(rank: int, world: int, ep: int, port: int, out: str, save_dir: str | None) -> None:
    """Every router: loss and full gradients of one FSDP+EP step; optionally save a checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from moelab.parallel.fsdp_ep import build_mesh, expert_parameter_bytes, parallelize

    init(rank, world, port)
    mesh = build_mesh("cpu", world, ep)
    x, ids = global_batch()
    results = {}
    for router in ROUTERS:
        model = make_model(router)
        parallelize(model, mesh)
        loss = forward_loss(model, x.chunk(world)[rank], ids.chunk(world)[rank], 100 + rank)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {name: full(p.grad).clone() for name, p in model.named_parameters()}
        results[router] = (mean_loss.item() / world, grads)
        if router == "topk":
            results["expert_bytes"] = expert_parameter_bytes(model)
            if save_dir:
                torch.optim.SGD(model.parameters(), lr=0.5).step()  # weights that differ from init
                dcp.save({"state_dict": get_model_state_dict(model)}, checkpoint_id=save_dir)
                y = model(x.chunk(world)[rank], ids.chunk(world)[rank])
                outputs = [torch.empty_like(y) for _ in range(world)]
                dist.all_gather(outputs, y.detach())
                results["outputs"] = torch.cat(outputs)
    if world == 2:
        results["bf16"] = bf16_params_step(mesh, x.chunk(world)[rank], ids.chunk(world)[rank], rank, world)
    if rank == 0:
        torch.save(results, out)
    finish()


def bf16_params_step(mesh, x: torch.Tensor, ids: torch.Tensor, rank: int, world: int) -> dict:
    """One topk step under FSDP2's bf16 parameter policy (trainer.strategy.param_dtype=bf16):
    the dtypes the dense and expert weights have during the forward, the mean loss, and the
    dtypes of the sharded master weights and their gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moelab.parallel.fsdp_ep import parallelize

    model = make_model("topk")
    seen = {}

    def record(name: str, weight: str):
        def hook(module: nn.Module, args) -> None:  # after FSDP's own pre-forward hook has gathered
            seen.setdefault(name, getattr(module, weight).dtype)
        return hook

    parallelize(model, mesh, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    model.proj.register_forward_pre_hook(record("dense", "weight"))
    model.moe.experts.register_forward_pre_hook(record("experts", "w1_EDF"))
    loss = forward_loss(model, x, ids, 100 + rank)
    loss.backward()
    mean_loss = loss.detach().float().clone()
    dist.all_reduce(mean_loss)
    return {"forward": seen, "loss": mean_loss.item() / world,
            "master": {p.dtype for p in model.parameters()}, "grads": {p.grad.dtype for p in model.parameters()}}


def load_worker(rank: int, world: int, ep: int, port: int, out: str, checkpoint: str) -> None:
    """Load the topk checkpoint into a (world, ep) layout and record the outputs on the global batch."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from moelab.parallel.fsdp_ep import build_mesh, parallelize

    init(rank, world, port)
    model = parallelize(make_model("topk", seed=123), build_mesh("cpu", world, ep))  # other init: must be overwritten
    state = {"state_dict": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["state_dict"])
    x, ids = global_batch()
    y = model(x.chunk(world)[rank], ids.chunk(world)[rank])
    outputs = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(outputs, y.detach())
    if rank == 0:
        torch.save(torch.cat(outputs), out)
    finish()
