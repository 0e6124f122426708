"""The Lightning strategy for FSDP2 + expert parallelism: Lightning's ModelParallelStrategy
with a (dp, ep) mesh in which every rank is data parallel for the dense weights."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy

from moelab.moe.errors import ConfigError
from moelab.parallel.fsdp_ep import build_mesh

PARAM_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class FSDPExpertParallelStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks, experts split over `expert_parallel_size` ranks.

    The LightningModule applies the sharding in `configure_model` with
    `moelab.parallel.fsdp_ep.parallelize(model, self.device_mesh)`. Unlike tensor
    parallelism, every rank reads its own data (ranks of an ep group route different
    tokens), so the sampler splits data over all ranks. Checkpoints are distributed
    (a folder); expert stacks are stored whole and reload into any ep.

    `param_dtype` (bf16, fp16 or None): FSDP2's mixed precision, parameters all-gathered and
    computed in that dtype, gradients reduced in fp32, the sharded master weights and the
    optimizer in fp32; None keeps the parameters fp32 (autocast, if the trainer's precision
    asks for it, casts per op). The router computes in fp32 either way.
    """

    def __init__(self, expert_parallel_size: int = 1, save_distributed_checkpoint: bool = True,
                 param_dtype: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.expert_parallel_size = expert_parallel_size
        if param_dtype is not None and str(param_dtype) not in PARAM_DTYPES:
            raise ConfigError(f"trainer.strategy.param_dtype={param_dtype} must be null, bf16 or fp16")
        self.param_dtype = param_dtype

    @property
    def mp_policy(self) -> MixedPrecisionPolicy:
        """The policy `parallelize` applies to every FSDP2 unit."""
        if self.param_dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[str(self.param_dtype)], reduce_dtype=torch.float32)

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
