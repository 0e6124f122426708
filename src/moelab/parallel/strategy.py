"""The Lightning strategy for FSDP2 + expert parallelism: Lightning's ModelParallelStrategy
with a (dp, ep) mesh in which every rank is data parallel for the dense weights."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from moelab.parallel.fsdp_ep import build_mesh


class FSDPExpertParallelStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks, experts split over `expert_parallel_size` ranks.

    The LightningModule applies the sharding in `configure_model` with
    `moelab.parallel.fsdp_ep.parallelize(model, self.device_mesh)`. Unlike tensor
    parallelism, every rank reads its own data (ranks of an ep group route different
    tokens), so the sampler splits data over all ranks. Checkpoints are distributed
    (a folder); expert stacks are stored whole and reload into any ep.
    """

    def __init__(self, expert_parallel_size: int = 1, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.expert_parallel_size = expert_parallel_size

    def setup_environment(self) -> None:
        self._setup_distributed()
        self._device_mesh = build_mesh(self.root_device.type, self.world_size, self.expert_parallel_size)
        self._data_parallel_size = self.world_size // self.expert_parallel_size
        self._tensor_parallel_size = self.expert_parallel_size
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}
