"""Distillation: the training step's loss mixes CE with T²·KL to a frozen teacher's logits,
written out here, for the vision and the language task; train.py distils a dense student
from an MoE checkpoint and keeps the teacher out of its checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.run.build import build
from moelab.run.train import run
from moelab.tasks.base import distillation_kl

from ..conftest import LM_FAST, VIT_FAST, compose_config, one_line_error


def test_distillation_kl_is_the_temperature_scaled_kl_written_out():
    torch.manual_seed(0)
    s, t, T = torch.randn(3, 5, 7), torch.randn(3, 5, 7), 2.5
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(distillation_kl(s, t, T), expected)
    assert distillation_kl(t, t, T).abs() < 1e-6


def distilling_task(tmp_path, fast: list[str]):
    """A dense student's task with an MoE teacher of the same data attached (untrained: the
    mix is what is checked), outside a Trainer, and the training metrics it logs."""
    cfg = compose_config(tmp_path / "student", *fast, "model.moe_every=0", "task.distill_weight=0.3",
                         "task.distill_temperature=3.0")
    _, task, _ = build(cfg)
    _, teacher_task, _ = build(compose_config(tmp_path / "teacher", *fast))
    task.attach_teacher(teacher_task.model)
    logged = {}
    task.log_dict = lambda values, **kwargs: logged.update(values)
    task.log = lambda name, value, **kwargs: logged.update({name: value})
    return task, teacher_task.model, logged


def check_the_mix(task, teacher, logged, batch, ce_of) -> None:
    """The training step's loss is 0.7·CE + 0.3·T²·KL (T = 3), both worked out here from the
    student's and the teacher's logits; the teacher's term is material (the step without it
    would be 0.7·CE, or CE) and is logged as `train/distill_kl`."""
    inputs, targets = batch
    torch.manual_seed(1)
    loss = task.training_step(batch, 0)
    torch.manual_seed(1)
    logits = task(inputs)
    with torch.no_grad():
        kl = distillation_kl(logits, teacher(inputs), 3.0)
    ce = ce_of(logits, targets)
    assert kl > 0.01
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kl)
    torch.testing.assert_close(logged["train/distill_kl"], kl)
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen
    assert "teacher" not in dict(task.named_children()) and not any(k.startswith("teacher") for k in task.state_dict())


def test_the_vision_training_loss_mixes_ce_and_kl_to_the_frozen_teacher(tmp_path):
    task, teacher, logged = distilling_task(tmp_path, VIT_FAST)
    batch = (torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9]))
    check_the_mix(task, teacher, logged, batch, F.cross_entropy)


def test_the_language_training_loss_mixes_ce_and_kl_to_the_frozen_teacher(tmp_path):
    """The LM computes the full logits only when it distils (without a teacher its loss head
    works in row chunks): CE over every position, T²·KL averaged over every position."""
    task, teacher, logged = distilling_task(tmp_path, LM_FAST)
    ids = torch.randint(0, 256, (2, 33))
    check_the_mix(task, teacher, logged, (ids[:, :-1], ids[:, 1:]),
                  lambda logits, targets: F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()))


def test_train_py_distils_a_dense_student_from_an_moe(tmp_path):
    run(compose_config(tmp_path / "teacher", *VIT_FAST))
    teacher_ckpt = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    run(compose_config(tmp_path / "student", *VIT_FAST, "model.moe_every=0", f"teacher={teacher_ckpt}"))
    student = torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("experts" in k for k in student) and not any(k.startswith("teacher") for k in student)
    assert "teacher=/no/such.ckpt does not exist" in one_line_error(compose_config(tmp_path / "bad", *VIT_FAST, "teacher=/no/such.ckpt"))
    # Switch's start: every teacher weight outside the MoE layers, the MoE blocks' FFNs their own init.
    run(compose_config(tmp_path / "shared", *VIT_FAST, "model.moe_every=0", f"teacher={teacher_ckpt}",
                       "teacher_init_shared=true", "task.lr=1e-9"))
    started = torch.load(tmp_path / "shared" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    teacher = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    same = [k for k in started if k in teacher and started[k].shape == teacher[k].shape]
    assert len(same) > len(started) // 2
    for key in same:
        torch.testing.assert_close(started[key], teacher[key], atol=1e-5, rtol=0, msg=key)
    own = [k for k in started if k not in teacher]
    assert own and all(".mlp." in k or ".ffn." in k for k in own), own  # the dense FFNs where the teacher has MoE
    assert all(not torch.allclose(started[k], student[k]) for k in own if student[k].dim() > 1)  # not copied elsewhere
    assert "teacher_init_shared=true copies weights from the teacher: add teacher=" in one_line_error(
        compose_config(tmp_path / "bad2", *VIT_FAST, "teacher_init_shared=true"))
