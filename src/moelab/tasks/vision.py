"""Image classification with a MoE backbone: cross-entropy plus the layers' auxiliary losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
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
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        check_optimizer_hparams(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.fine_tune(freeze, aux_loss_scale)
        self.compile_blocks(compile, compile_backend)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
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
        self.train_acc(logits, labels)
        self.throughput.step(self, images.shape[0], self._image_flops())
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/acc": self.train_acc}, prog_bar=True)
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

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
        accuracy(logits, labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)
