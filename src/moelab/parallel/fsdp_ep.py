"""FSDP2 + expert parallelism applied to an already-built model from outside (torchtitan style).

Mesh (dp, ep), world W = dp·ep. Every MoE layer's expert weight stacks become DTensors
split by expert over `ep` (E/ep experts per rank) and are sharded by FSDP over `dp` (the
ranks that hold the same experts); everything else is sharded by FSDP over all W ranks.
Because experts are DTensors with a global (E, …) shape, distributed checkpoints hold
whole expert stacks and load into any ep / dp layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moelab.moe.errors import ConfigError
from moelab.moe.experts import local_part
from moelab.moe.routed import moe_layers
from moelab.parallel.expert_parallel import ExpertParallelExchange

MESH_DIMS = ("dp", "ep")


def build_mesh(device_type: str, world_size: int, ep: int) -> DeviceMesh:
    """The (dp, ep) mesh over `world_size` ranks; ep must divide the world size."""
    check_ep(world_size, ep)
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=MESH_DIMS)


def check_ep(world_size: int, ep: int, num_experts: int | None = None) -> None:
    if ep < 1 or world_size % ep:
        raise ConfigError(f"ep={ep} must divide the number of processes ({world_size}): pick ep in the divisors of {world_size}")
    if num_experts is not None and num_experts % ep:
        raise ConfigError(f"experts={num_experts} is not divisible by ep={ep}: each rank must own experts/ep experts")


def split_experts(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Make every MoE layer's expert stacks DTensors sharded by expert over `ep_mesh` and
    attach the all-to-all exchange. Ranks must hold identical weights beforehand (same seed)."""
    ep = ep_mesh.size()
    for layer in moe_layers(model):
        experts = layer.experts
        if not hasattr(experts, "expert_weights"):
            raise ConfigError(f"{type(experts).__name__} has no expert weight stacks to split across ep ranks")
        if getattr(experts, "shared_base", False) and ep > 1:
            raise ConfigError(
                f"{type(experts).__name__} share one base FFN, whose gradients would need reducing over the ep ranks "
                "as well: run expert=lora with ep=1 (trainer=fsdp or ddp)"
            )
        if getattr(layer.router, "kind", None) == "smear" and ep > 1:
            raise ConfigError("router=smear merges every expert's weights for every token, so each rank needs all "
                              "experts: run it with ep=1 (trainer=fsdp, or ddp)")
        check_ep(ep_mesh.size(), ep, layer.num_experts)
        for name, weight in experts.expert_weights().items():
            if not isinstance(weight, DTensor):
                setattr(experts, name, nn.Parameter(distribute_tensor(weight.data, ep_mesh, [Shard(0)])))
        layer.expert_exchange = ExpertParallelExchange(ep_mesh.get_group(), layer.num_experts) if ep > 1 else None


def parallelize(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Apply EP to the experts and FSDP2 to everything (in place; idempotent)."""
    if getattr(model, "_moelab_parallelized", False):
        return model
    mp_policy = mp_policy or MixedPrecisionPolicy()
    dp_mesh, ep_mesh = mesh["dp"], mesh["ep"]
    split_experts(model, ep_mesh)
    for layer in moe_layers(model):
        # Dim 0 is already split by expert over ep; FSDP shards dim 1 of the stacks.
        fully_shard(layer.experts, mesh=dp_mesh, mp_policy=mp_policy, shard_placement_fn=_shard_expert_stacks)
    world_mesh = mesh if mesh.ndim == 1 else _flat_mesh(mesh)
    fully_shard(model, mesh=world_mesh, mp_policy=mp_policy)
    model._moelab_parallelized = True
    return model


def _shard_expert_stacks(param: nn.Parameter) -> Shard | None:
    return Shard(1) if param.ndim >= 2 else None  # weight stacks (E, ., .) and bias stacks (E, .)


def _flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh over every rank of `mesh` (all ranks are data parallel for dense weights)."""
    return init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("world",))


def expert_parameter_bytes(model: nn.Module) -> int:
    """Bytes of expert weights stored on this rank (local shards)."""
    total = 0
    for layer in moe_layers(model):
        for weight in layer.experts.expert_weights().values():
            local = local_part(weight)
            total += local.numel() * local.element_size()
    return total


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sharded_grad_norm(parameters, poison: torch.Tensor | None = None) -> torch.Tensor:
    """The global gradient norm of parameters sharded over different meshes.

    torch's clip_grad_norm_ cannot stack norms of DTensors on different meshes (experts
    on (dp, ep), the rest on all ranks). FSDP2 shards are disjoint across ranks, so the
    global squared norm is the sum over ranks of each rank's local squared norms: one
    all-reduce. `poison` (a scalar, e.g. this rank's loss × 0) is added before it, so a
    non-finite value on any rank makes the norm non-finite on every rank.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    local_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for grad in grads:
        local_sq = local_sq + local_part(grad).float().square().sum()
    if poison is not None:
        local_sq = local_sq + poison.detach().float().to(local_sq.device)
    if is_distributed():
        dist.all_reduce(local_sq)
    return local_sq.sqrt()


def clip_grads_(parameters, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every (local shard of a) gradient by min(1, max_norm / total_norm)."""
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for param in parameters:
        if param.grad is not None:
            local_part(param.grad).mul_(scale.to(param.grad.dtype))
