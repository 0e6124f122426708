"""Next-token language modelling with a MoE decoder: cross-entropy plus the layers' auxiliary losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric

from moelab.moe.errors import ConfigError
from moelab.moe.routed import routed_layers
from moelab.tasks.base import MoETask
from moelab.tasks.throughput import Throughput, training_flops_per_token
from moelab.tasks.optim import check_optimizer_hparams


class LanguageModeling(MoETask):
    """Logs `train/loss`, `train/ce`, `train/aux/<name>` (mean over MoE layers, unweighted),
    `train/tokens_per_s`, and per evaluation stage `<stage>/loss` (mean next-token
    cross-entropy in nats over all evaluated tokens), `<stage>/ppl` = exp(loss) and, when the
    bytes per token are known, `<stage>/bpb` = loss / (ln 2 · bytes_per_token) — bits per byte
    of the original text (bytes_per_token = 1 on byte data), with the evaluated split's own
    ratio.

    `bytes_per_token` null takes the datamodule's ratio for the split (pystdlib: 1; token
    files: from their meta.json, one ratio per split); bpb is not logged when neither knows it.
    At each validation, rank 0 logs `samples/continuation` to TensorBoard: `sample_tokens`
    sampled tokens after the first `sample_prompt_tokens` of the first validation window,
    drawn with a generator seeded by `sample_seed` (the same text for the same weights).
    """

    hparams_metrics = ("val/bpb", "val/loss", "test/bpb", "test/loss")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        bytes_per_token: float | None = None,
        sample_tokens: int = 48,
        sample_prompt_tokens: int = 32,
        sample_temperature: float = 0.8,
        sample_seed: int = 0,
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
        self.eval_ce = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self._sample_prompt: Tensor | None = None
        self.throughput = Throughput("tokens_per_s")
        self._flops_per_token: float | None = None

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.model(token_ids)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._fit_hash_frequencies()

    def _fit_hash_frequencies(self) -> None:
        """Frequency-balanced hash routers (router.balance=frequency) get their maps from the
        training split's token counts, before any parallel wrapping; the same data give the
        same maps, and checkpoints carry them."""
        routers = [layer.router for layer in routed_layers(self.model) if getattr(layer.router, "balance", None) == "frequency"]
        masked = [layer.router for layer in routed_layers(self.model) if getattr(layer.router, "token_mask", None)]
        if not routers and not masked:
            return
        token_counts = getattr(self.trainer.datamodule, "token_counts", None)
        if token_counts is None:
            what = "router.balance=frequency" if routers else "router.token_mask"
            raise ConfigError(f"{what} needs the training data's token counts: use a text datamodule")
        counts = torch.from_numpy(token_counts("train"))
        for router in routers:
            router.fit_key_frequencies(counts)
        for router in masked:
            router.fit_token_mask(counts)

    def bytes_per_token(self, split: str) -> float | None:
        """Bytes of text per token of `split`: the task's setting, else the datamodule's
        ratio for that split (`bytes_per_token_of`), else None."""
        if self.hparams.bytes_per_token is not None:
            return float(self.hparams.bytes_per_token)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        per_split = getattr(datamodule, "bytes_per_token_of", None)
        if per_split is not None:
            return per_split(split)
        value = getattr(datamodule, "bytes_per_token", None)
        return None if value is None else float(value)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        if self.teacher is None:  # the head and its loss in row chunks: no full fp32 logits
            ce = self.model(inputs, targets)
            loss = self.add_aux_losses(ce)
        else:  # distillation compares the logits themselves
            logits = self(inputs)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss = self.add_aux_losses(self.with_teacher(ce, logits, inputs))
        self.log_step({"train/loss": loss, "train/ce": ce})
        self._log_throughput(inputs)
        return loss

    def _log_throughput(self, inputs: Tensor) -> None:
        if self._flops_per_token is None:
            model = self.model
            self._flops_per_token = training_flops_per_token(model, model.depth, model.d_model, inputs.shape[1], causal=True)
        self.throughput.step(self, inputs.numel(), self._flops_per_token)

    def on_train_epoch_start(self) -> None:
        self.throughput.restart()

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int) -> None:
        inputs, targets = batch
        keep = self.real_rows(batch_idx, inputs.shape[0], stage)  # none of the sampler's padding
        if keep is not None and keep.numel() == 0:
            self.model(inputs, targets)  # the forward every rank runs (FSDP gathers weights in it), counted nowhere
            return
        if keep is not None:
            inputs, targets = inputs.index_select(0, keep), targets.index_select(0, keep)
        ce = self.model(inputs, targets)  # the mean cross-entropy, head in row chunks
        self.eval_ce[stage].update(ce, weight=targets.numel())

    def _log_epoch(self, stage: str) -> None:
        metric = self.eval_ce[stage]
        loss = metric.compute()
        metric.reset()
        values = {f"{stage}/loss": loss, f"{stage}/ppl": loss.exp()}
        bytes_per_token = self.bytes_per_token(stage)
        if bytes_per_token:
            values[f"{stage}/bpb"] = loss / (math.log(2) * bytes_per_token)
        # The metric's compute() already reduced across ranks, so every rank holds the same
        # values; sync_dist only averages equal numbers (and keeps Lightning from warning).
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if batch_idx == 0 and self._sample_prompt is None:
            self._sample_prompt = batch[0][:1, : self.hparams.sample_prompt_tokens].detach().clone()
        self._evaluate(batch, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        # Sharded weights: generating needs every rank's shards, so all ranks sample.
        if (self.trainer.is_global_zero or self.device_mesh is not None) and not self.trainer.sanity_checking:
            self._log_sample()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def sample(self, prompt: Tensor) -> Tensor:
        """The deterministic continuation logged at each validation (new tokens only)."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.sample_seed)
        tokens = self.model.generate(
            prompt, hp.sample_tokens, temperature=hp.sample_temperature, generator=generator,
            max_context=prompt.shape[1] + hp.sample_tokens,
        )
        return tokens[0, prompt.shape[1] :]

    def _log_sample(self) -> None:
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers or self._sample_prompt is None or self.hparams.sample_tokens < 1:
            return
        decode = getattr(self.trainer.datamodule, "decode", None) or (lambda ids: " ".join(map(str, ids)))
        prompt = self._sample_prompt.to(self.device)
        continuation = self.sample(prompt)
        # TensorBoard renders text as Markdown: indent by four spaces for a code block.
        text = decode(prompt[0].tolist()) + "⟦" + decode(continuation.tolist()) + "⟧"
        markdown = "\n".join("    " + line for line in text.splitlines())
        for writer in writers:
            writer.add_text("samples/continuation", markdown, global_step=self.global_step)
