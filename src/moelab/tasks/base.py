"""What every MoE task shares: auxiliary losses into the training loss, per-step router
updates, and AdamW with warm-up + cosine."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from moelab.moe.layer import after_optimizer_step, collect_aux_losses
from moelab.parallel.fsdp_ep import clip_grad_norm_, parallelize
from moelab.tasks.optim import adamw_param_groups, warmup_cosine


class MoETask(L.LightningModule):
    """Base LightningModule: subclasses set `self.model`, save hyperparameters `lr`,
    `weight_decay`, `betas`, `warmup_steps`, `min_lr_ratio`, and call `add_aux_losses`."""

    model: nn.Module

    def configure_model(self) -> None:
        """Under FSDPExpertParallelStrategy: split experts over ep and shard with FSDP2
        (idempotent; a no-op for single-device and DDP runs, which have no mesh)."""
        if self.device_mesh is not None:
            parallelize(self.model, self.device_mesh)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Sharded runs clip with a norm that spans the expert and dense meshes."""
        if self.device_mesh is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("sharded MoE runs clip by norm only: set trainer.gradient_clip_algorithm=norm")
        clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)

    def add_aux_losses(self, task_loss: Tensor) -> Tensor:
        """task loss + Σ weighted aux losses of every MoE layer; logs each aux loss by name
        (`train/aux/<name>`, unweighted, mean over layers)."""
        aux_total, aux_by_name = collect_aux_losses(self.model)
        self.log_dict({f"train/aux/{name}": value for name, value in aux_by_name.items()})
        return task_loss if aux_total is None else task_loss + aux_total

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        after_optimizer_step(self.model)

    def configure_optimizers(self):
        hp = self.hparams
        groups = adamw_param_groups(self.model, hp.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, min(hp.warmup_steps, total_steps), total_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
