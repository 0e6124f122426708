"""What every MoE task shares: auxiliary losses into the training loss, per-step router
updates, AdamW with warm-up + cosine, the guard that stops a diverging run, and training
metrics that reach the host only on logging steps."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.routed import after_optimizer_step, collect_aux_losses
from moelab.parallel.fsdp_ep import clip_grads_, parallelize, sharded_grad_norm
from moelab.tasks.checkpoint_io import CONFIG_KEY
from moelab.tasks.divergence import DivergenceGuard
from moelab.tasks.finetune import freeze as freeze_groups
from moelab.tasks.optim import adamw, adamw_param_groups, warmup_cosine


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over every position with a class
    distribution (last dim), in fp32. The T² keeps its gradient on the scale of the CE's
    as T changes (Hinton et al. 2015)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class MoETask(L.LightningModule):
    """Base LightningModule: subclasses set `self.model`, save hyperparameters `lr`,
    `weight_decay`, `betas`, `warmup_steps`, `min_lr_ratio`, and call `add_aux_losses`.

    A training step queues device work and returns: it reads nothing back from the device.
    Its metrics (`log_step`) go to Lightning only on the steps Lightning writes them
    (`trainer.log_every_n_steps`), `train/grad_norm` (before clipping) among them. The
    divergence guard (moelab.tasks.divergence) decides on the device: a step with a
    non-finite loss or gradient norm is skipped by the fused optimizer, and the run ends
    with `Diverged` at the next logging step, checkpoint or end of the fit, naming the step
    and what turned non-finite first. Optimizers without a device-side skip (an fp16 loss
    scaler, a device without fused AdamW) check on the host every step instead.
    """

    model: nn.Module
    _step_loss: Tensor | None = None
    _guard: DivergenceGuard | None = None
    _host_checked = False  # the optimizer cannot skip a step on the device: check each step

    @property
    def guard(self) -> DivergenceGuard:
        if self._guard is None:
            self._guard = DivergenceGuard()
        return self._guard

    def log_due(self) -> bool:
        """Whether this training step's metrics are logged: on the steps Lightning writes step
        metrics (every `trainer.log_every_n_steps`, and when the fit stops), and on the fit's
        last step, whose values `metrics.json` records. Values logged on other steps would
        still be read back from the device (Lightning turns progress-bar metrics into numbers
        after every batch)."""
        if self._trainer is None:
            return True
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        if getattr(connector, "should_update_logs", True) or trainer.fast_dev_run:
            return True
        if 0 <= trainer.max_steps <= trainer.global_step + 1:
            return True
        max_epochs = trainer.max_epochs
        return bool(trainer.is_last_batch) and max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1

    metrics_logged_at: int | None = None
    """The optimizer step whose training metrics were logged last (the progress bar reads
    them once per such step: moelab.callbacks.progress)."""

    def real_rows(self, batch_idx: int, rows: int, stage: str) -> Tensor | None:
        """Which rows of evaluation batch `batch_idx` are not padding, or None when all are.
        On more than one rank, Lightning's DistributedSampler makes every rank's share equal by
        repeating the first items at the end, so a test metric would count them twice; it
        deals item i to rank i mod w in order (no shuffling for evaluation), so the padded
        rows are those whose global position r + j·w is past the dataset's end. Worked out on
        the host from the sampler's numbers: no device read."""
        from torch.utils.data import DistributedSampler

        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.shuffle or sampler.drop_last or not loader.batch_size:
            return None
        items, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
        first = rank + batch_idx * loader.batch_size * world
        if first + (rows - 1) * world < items:
            return None  # every row of this batch is a real item
        keep = [j for j in range(rows) if first + j * world < items]
        return torch.tensor(keep, dtype=torch.long, device=self.device)

    def log_step(self, values: Mapping[str, Any]) -> None:
        """Training metrics of this step, handed to Lightning when a log is due (`log_due`).
        Callers compute values that cost more than the loss only when `log_due()`."""
        if values and self.log_due():
            self.log_dict(dict(values))
            if self._trainer is not None:
                self.metrics_logged_at = self.trainer.global_step

    def configure_model(self) -> None:
        """Under FSDPExpertParallelStrategy: split experts over ep and shard with FSDP2
        (idempotent; a no-op for single-device and DDP runs, which have no mesh), with the
        strategy's mixed-precision policy. Then `task.compile`: each transformer block, or
        the whole model."""
        if self.device_mesh is not None:
            parallelize(self.model, self.device_mesh, getattr(self.trainer.strategy, "mp_policy", None))
        if self._compile_backend is not None and not getattr(self.model, "_moelab_compiled", False):
            if self._compile_mode == "model":
                self.model.compile(backend=self._compile_backend)
            else:
                for block in transformer_blocks(self.model):
                    block.compile(backend=self._compile_backend)
            self.model._moelab_compiled = True

    _compile_backend: str | None = None
    _compile_mode: str = "blocks"

    run_config: dict[str, Any] | None = None
    """The run's composed config (set by moelab.run.train): every checkpoint carries it under
    `moelab_config`, so `moelab.load`, `eval.py` and the task loader rebuild the model."""

    run_hparams: dict[str, Any] | None = None
    """Settings that tell runs apart (moelab.run.summary.run_hparams, set by moelab.run.train): logged
    with the task's hyperparameters, so TensorBoard's HPARAMS dashboard compares runs by them."""

    # The metrics TensorBoard's HPARAMS dashboard shows next to them (subclasses name theirs).
    hparams_metrics: tuple[str, ...] = ("val/loss", "test/loss")

    def log_hparams_summary(self) -> None:
        """The task's hyperparameters and `run_hparams` as a TensorBoard hparams summary with
        `hparams_metrics` as its metrics (Lightning writes one only when given metric values,
        which it would also log as scalars at step 0)."""
        from lightning.pytorch.loggers import TensorBoardLogger
        from torch.utils.tensorboard.summary import hparams

        if not self.trainer.is_global_zero:
            return
        params = hparams_in_order(self.run_hparams or {}, dict(self.hparams))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment._get_file_writer()
                for summary in hparams(params, {name: 0.0 for name in self.hparams_metrics}):
                    writer.add_summary(summary)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's loader, with the model built from the config the checkpoint carries
        (the model is not a hyperparameter), so `Task.load_from_checkpoint(path)` needs no
        other argument. A sharded folder is refused in one line: `moelab.load(path)` reads it."""
        from pathlib import Path

        from moelab.tasks.checkpoint_io import load_model

        if Path(str(checkpoint_path)).is_dir():
            raise ConfigError(f"{checkpoint_path} is a sharded checkpoint folder: read its model with "
                              "moelab.load(path), or resume it with trainer=fsdp/fsdp_ep")
        if "model" not in kwargs:
            kwargs["model"] = load_model(str(checkpoint_path), "checkpoint")
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

    def compile_blocks(self, compile: bool | str = False, backend: str = "inductor") -> None:
        """`task.compile`: `blocks` (or true) compiles every transformer block (`model.blocks`,
        or a ViT's `model.vit.blocks`) when the model is configured, per block as torchtitan
        does, so a recompile stays local to one block; `model` compiles the model's whole
        forward (the LM's loss head included), as a plain training loop would."""
        if compile is False or compile is None:
            return
        mode = "blocks" if compile is True else compile
        if mode not in ("blocks", "model"):
            raise ConfigError(f"task.compile={compile} must be false, blocks (or true) or model")
        if mode == "blocks" and not transformer_blocks(self.model):
            raise ConfigError(f"task.compile=true compiles transformer blocks; {type(self.model).__name__} has none")
        self._compile_backend, self._compile_mode = backend, mode

    aux_loss_scale: float = 1.0

    def fine_tune(self, freeze: list[str] | tuple[str, ...] = (), aux_loss_scale: float = 1.0) -> None:
        """Fine-tuning recipes (moelab.tasks.finetune): freeze the named parameter groups
        (`task.freeze=[experts]`, ...) and scale every auxiliary loss by `aux_loss_scale`."""
        if isinstance(aux_loss_scale, bool) or not isinstance(aux_loss_scale, (int, float)) or not aux_loss_scale >= 0:
            raise ConfigError(f"task.aux_loss_scale={aux_loss_scale} must be a number >= 0")
        if isinstance(freeze, str):
            freeze = [freeze]
        self.aux_loss_scale = float(aux_loss_scale)
        self.frozen = freeze_groups(self.model, freeze)

    teacher: nn.Module | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 2.0

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Distil from a frozen `teacher` (e.g. a trained MoE into a dense student): the task
        loss becomes (1 − w)·CE + w·T²·KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al. 2015;
        Fedus et al. 2021, sec. 5), w = task.distill_weight, T = task.distill_temperature.
        The teacher is kept out of the state dict and the optimizer."""
        weight = self.hparams.get("distill_weight", 0.5)
        temperature = self.hparams.get("distill_temperature", 2.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ConfigError(f"task.distill_weight={weight} must be between 0 and 1")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"task.distill_temperature={temperature} must be a number > 0")
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: not saved, not trained
        self.distill_weight, self.distill_temperature = float(weight), float(temperature)

    def on_fit_start(self) -> None:
        self.log_hparams_summary()
        if self.teacher is not None:
            self.teacher.to(self.device)

    def with_teacher(self, ce: Tensor, student_logits: Tensor, inputs: Tensor) -> Tensor:
        """`ce`, or with a teacher attached the distillation mix (attach_teacher); logs
        `train/distill_kl`."""
        if self.teacher is None:
            return ce
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if teacher_logits.shape != student_logits.shape:
            raise ConfigError(f"the teacher's logits are {tuple(teacher_logits.shape)}, the student's "
                              f"{tuple(student_logits.shape)}: distil from a model of the same data and classes")
        kl = distillation_kl(student_logits, teacher_logits, self.distill_temperature)
        self.log_step({"train/distill_kl": kl})
        return (1 - self.distill_weight) * ce + self.distill_weight * kl

    def add_aux_losses(self, task_loss: Tensor) -> Tensor:
        """task loss + aux_loss_scale × Σ weighted aux losses of every MoE layer; logs each
        aux loss by name (`train/aux/<name>`, unweighted, mean over layers)."""
        aux_total, aux_by_name = collect_aux_losses(self.model, per_name=self.log_due())
        self.log_step({f"train/aux/{name}": value for name, value in aux_by_name.items()})
        loss = task_loss if aux_total is None else task_loss + self.aux_loss_scale * aux_total
        self._step_loss = loss.detach()
        return loss

    def on_train_start(self) -> None:
        self.guard.start(self.trainer.global_step, self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.guard.keep(self.trainer.global_step, batch)  # for the divergence diagnosis (a reference, no copy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.check(self)  # never a checkpoint of a run that diverged
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config

    def on_train_end(self) -> None:
        self.guard.check(self)  # a fit that diverged after its last check does not end ok

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Measure the global gradient norm (sharded runs: over the expert and dense meshes),
        hand the divergence guard its verdict, then clip as configured."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss = self._step_loss if self._step_loss is not None else torch.zeros(())
        # loss × 0 is 0, or NaN when the loss is not finite: it poisons the norm, so one
        # number says whether this step can be taken. Sharded runs sum it over every rank
        # inside the norm's all-reduce; under DDP the gradients are already all-reduced, and
        # a non-finite loss on a rank makes its gradients, hence everyone's, non-finite.
        poison = loss.float() * 0.0
        if self.device_mesh is not None:
            grad_norm = sharded_grad_norm(params, poison)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            grad_norm = grad_norm + poison.to(grad_norm.device)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling skips steps with non-finite gradients by itself: only the loss
            # counts, and it is this rank's own, so ranks agree on it (one more all-reduce).
            if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(poison)), all=True):
                self.guard.update(loss, poison)
                self.guard.check(self)
        else:
            found_inf = self.guard.update(loss, grad_norm)
            if self._host_checked or self.log_due():
                self.guard.check(self)  # raises before this step if any step so far was not finite
            if not self._host_checked:
                optimizer.found_inf = found_inf  # the fused AdamW skips a non-finite step on the device
        self.log_step({"train/grad_norm": grad_norm})
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            if self.device_mesh is not None:
                raise ConfigError("sharded MoE runs clip by norm only: set trainer.gradient_clip_algorithm=norm")
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_grads_(params, gradient_clip_val, grad_norm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        after_optimizer_step(self.model)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer, fused = adamw(adamw_param_groups(self.model, hp.weight_decay), hp.lr, tuple(hp.betas))
        self._host_checked = not fused  # only the fused kernel reads `found_inf`
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, min(hp.warmup_steps, total_steps), total_steps, hp.min_lr_ratio)
        # `name`: the learning rate as `train/lr` (`train/lr/pg<i>` per group), beside the losses.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: `model.blocks` (the LM) or `model.vit.blocks` (the ViT)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None and hasattr(model, "vit"):
        blocks = getattr(model.vit, "blocks", None)
    return list(blocks) if blocks is not None else []



# Task hyperparameters that say how the run computes or reports, not what it is: left out of
# the HPARAMS table (they are in the run's config).
NOT_HPARAMS = frozenset({"betas", "compile", "compile_backend", "sample_tokens", "sample_prompt_tokens",
                         "sample_temperature", "sample_seed", "bytes_per_token", "num_classes", "freeze"})


def hparams_in_order(run: Mapping[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """TensorBoard's HPARAMS columns, in the order its table shows them (it checks the first
    ones): the run's MoE settings and command-line keys (`run`, moelab.run.summary.run_hparams)
    first, then the learning rate and the task's other settings, without `NOT_HPARAMS`."""
    ordered = dict(run)
    if "lr" in task:
        ordered.setdefault("lr", task["lr"])
    for key in sorted(task):
        if key not in NOT_HPARAMS and key not in ordered and not (key == "freeze" and not task[key]):
            ordered[key] = task[key]
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in ordered.items()}
