"""Distillation: the loss mixes CE with T²·KL to a frozen teacher's logits, written out here;
train.py distils a dense student from an MoE checkpoint and keeps the teacher out of its
checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.run.build import build
from moelab.run.train import run
from moelab.tasks.base import distillation_kl

from ..conftest import VIT_FAST, compose_config, one_line_error


def test_distillation_kl_is_the_temperature_scaled_kl_written_out():
    torch.manual_seed(0)
    s, t, T = torch.randn(3, 5, 7), torch.randn(3, 5, 7), 2.5
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(distillation_kl(s, t, T), expected)
    assert distillation_kl(t, t, T).abs() < 1e-6


def test_the_training_loss_mixes_ce_and_kl_to_the_frozen_teacher(tmp_path):
    run(compose_config(tmp_path / "teacher", *VIT_FAST))
    teacher_ckpt = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    cfg = compose_config(tmp_path / "student", *VIT_FAST, "model.moe_every=0", f"teacher={teacher_ckpt}",
                         "task.distill_weight=0.3", "task.distill_temperature=3.0")
    _, task, _ = build(cfg)
    from moelab.tasks.checkpoint_io import load_model

    teacher = load_model(str(teacher_ckpt))
    task.attach_teacher(teacher)
    task.log = task.log_dict = lambda *args, **kwargs: None  # outside a Trainer
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    logits = task(images)
    ce = F.cross_entropy(logits, labels)
    mixed = task.with_teacher(ce, logits, images)
    expected = 0.7 * ce + 0.3 * distillation_kl(logits, teacher(images), 3.0)
    torch.testing.assert_close(mixed, expected)
    assert "teacher" not in dict(task.named_children()) and not any(k.startswith("teacher") for k in task.state_dict())


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
