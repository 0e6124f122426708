"""Image classification with a MoE backbone: cross-entropy plus the layers' auxiliary losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from moelab.tasks.base import MoETask
from moelab.tasks.optim import check_optimizer_hparams
from moelab.tasks.throughput import Throughput, training_flops_per_token


class ImageClassification(MoETask):
    """Logs `train/loss`, `train/ce`, `train/aux/<name>` (mean over MoE layers, unweighted),
    `train/acc`, `val/loss`, `val/acc`, `test/loss`, `test/acc`. Training batches may carry
    soft targets (B, classes), as Mixup/CutMix make them: the loss is then the soft-target
    cross-entropy and train/acc counts the dominant class."""

    hparams_metrics = ("val/acc", "val/loss", "test/acc", "test/loss")

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        freeze: list[str] = (),
        aux_loss_scale: float = 1.0,
        distill_weight: float = 0.5,
        distill_temperature: float = 2.0,
        compile: bool | str = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        check_optimizer_hparams(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.fine_tune(freeze, aux_loss_scale)
        self.compile_blocks(compile, compile_backend)
        # Evaluation metrics accumulate on the device and are read once, at the epoch's end.
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.eval_acc = nn.ModuleDict({stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test")})
        self.throughput = Throughput("images_per_s")
        self._flops_per_image: float | None = None

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        if labels.dim() == 2:  # soft targets (Mixup/CutMix, label smoothing): −Σ y log softmax(logits)
            ce = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
            labels = labels.argmax(-1)  # train/acc against the dominant class
        else:
            ce = F.cross_entropy(logits, labels)
        loss = self.add_aux_losses(self.with_teacher(ce, logits, images))
        self.throughput.step(self, images.shape[0], self._image_flops())
        if self.log_due():  # the batch's accuracy, computed only when it is logged
            accuracy = (logits.detach().argmax(-1) == labels).float().mean()
            self.log_step({"train/loss": loss, "train/ce": ce, "train/acc": accuracy})
        return loss

    def _image_flops(self) -> float | None:
        """Training FLOPs per image of a ViT (timm's layout: `.vit.blocks`), else None."""
        vit = getattr(self.model, "vit", None)
        if self._flops_per_image is None and vit is not None:
            tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
            per_token = training_flops_per_token(self.model, len(vit.blocks), vit.embed_dim, tokens, causal=False)
            self._flops_per_image = per_token * tokens
        return self._flops_per_image

    def on_train_epoch_start(self) -> None:
        self.throughput.restart()

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        keep = self.real_rows(batch_idx, labels.shape[0], stage)  # none of the sampler's padding
        if keep is not None:
            logits, labels = logits.index_select(0, keep), labels.index_select(0, keep)
            if labels.numel() == 0:
                return
        self.eval_loss[stage].update(F.cross_entropy(logits, labels), weight=labels.shape[0])
        self.eval_acc[stage].update(logits, labels)

    def _log_epoch(self, stage: str) -> None:
        """`<stage>/loss` (mean cross-entropy over every evaluated image) and `<stage>/acc`,
        over all ranks' images (the metrics' compute() reduces across ranks)."""
        self.log_dict({f"{stage}/loss": self.eval_loss[stage], f"{stage}/acc": self.eval_acc[stage]}, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
