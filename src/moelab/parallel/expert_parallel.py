"""Expert parallelism: tokens grouped by expert travel to the rank that owns the expert and back.

Plain torch.distributed (no Lightning): an `ExpertParallelExchange` is attached to a
MoELayer by `moelab.parallel.fsdp_ep.parallelize`; without one the layer runs every
expert locally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import Tensor, nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class ExpertParallelExchange:
    """All-to-all inside one expert-parallel group of R ranks, each owning E/R experts.

    Rank r owns experts [r·L, (r+1)·L), L = E/R. Given this rank's tokens grouped by
    global expert (rows per expert `group_sizes_E`), `__call__` sends every group to its
    owner with `all_to_all_single` (uneven splits, autograd-aware), regroups what arrives
    by local expert, runs the local experts in one grouped call, and returns the outputs
    to the ranks and rows they came from. The split sizes need one host sync per layer.

    Gradient scale: a rank's experts receive gradient from the tokens of all R ranks of
    its group, so the local expert weights' gradient is scaled by 1/R (the tokens'
    gradient is not); data-parallel averaging over the D ranks that hold the same experts
    then yields the mean over all D·R ranks, as for every dense parameter.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_experts // self.ep_size

    def __call__(self, x_ND: Tensor, group_sizes_E: Tensor, local_experts: nn.Module) -> Tensor:
        R, L = self.ep_size, self.num_local_experts
        send_counts_RL = group_sizes_E.reshape(R, L).contiguous()
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL, group=self.group)
        splits = torch.cat([send_counts_RL.sum(1), recv_counts_RL.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = splits[:R], splits[R:]

        received_MD = self._all_to_all(x_ND, recv_splits, send_splits)
        # Arrived grouped by (source rank, local expert): regroup by local expert.
        local_expert_M = torch.repeat_interleave(
            torch.arange(L, device=x_ND.device).repeat(R), recv_counts_RL.reshape(-1), output_size=received_MD.shape[0]
        )
        order_M = torch.argsort(local_expert_M, stable=True)
        experts_in_MD = _ScaleGrad.apply(received_MD[order_M], float(R))
        y_sorted_MD = _ScaleGrad.apply(local_experts(experts_in_MD, recv_counts_RL.sum(0)), 1.0 / R)
        y_received_MD = torch.empty_like(y_sorted_MD).index_copy(0, order_M, y_sorted_MD)
        return self._all_to_all(y_received_MD, send_splits, recv_splits)

    def _all_to_all(self, x: Tensor, output_splits: list[int], input_splits: list[int]) -> Tensor:
        return all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, self.group)
