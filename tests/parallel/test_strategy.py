"""train.py under multi-process strategies on CPU: Lightning's per-rank relaunch under Hydra,
FSDP+EP save and resharded resume, DDP inside a multirun, and the MoE lifecycle methods
(upcycling, distillation, freezing, merging, MaskMoE) on sharded checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moelab.data.digits import DigitsDataModule
from moelab.models.build import build_model as model_of
from moelab.moe.errors import ConfigError
from moelab.moe.routed import moe_layers
from moelab.tasks.checkpoint_io import load_model, read_model_state

from ..conftest import compose_config, one_line_error
from ..run.test_train import train_cli

LIMITS = ("trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "callbacks.progress=null", "trainer.accelerator=cpu")


def test_ddp_inside_a_multirun_runs_each_job_once_in_its_folder(tmp_path):
    sweep = tmp_path / "sweep"
    result = train_cli(
        tmp_path / "unused", "-m", f"hydra.sweep.dir={sweep}", "trainer=ddp", "trainer.devices=2", "experts=4,8",
        "trainer.max_epochs=1", "test=false", *LIMITS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")  # report/: the sweep report's figures
    assert jobs == ["0", "1"], jobs  # no rank started a sweep of its own
    assert (sweep / "report.md").is_file()  # one report, written by the launching process
    for job, experts in (("0", 4), ("1", 8)):
        folder = sweep / job
        assert (folder / "metrics.json").exists() and (folder / "train_ddp_process_1.log").exists()
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").experts == experts


def test_ep_without_expert_parallel_trainer_is_refused(tmp_path):
    line = one_line_error(compose_config(tmp_path / "run", "ep=2"))
    assert line == "moelab: error: ep=2 needs an expert-parallel trainer: add trainer=fsdp_ep"


def test_a_bad_input_found_on_every_rank_is_one_line_per_rank(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for split in ("train", "val", "test"):
        (np.arange(200, dtype=np.uint16) * 300).tofile(tokens / f"{split}.bin")  # ids up to 59700
    result = train_cli(tmp_path / "run", "trainer=ddp", "trainer.devices=2", "model=lm", "task=language", "data=tokens",
                       f"data.path={tokens}", "data.vocab_size=1024", "data.seq_len=16", "optimized_metric=val/loss", *LIMITS)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("moelab:")]
    why = f"{tokens}/train.bin holds token id 59700, outside data.vocab_size=1024: set data.vocab_size=59701 or more (or check data.dtype=uint16)"
    assert sorted(lines) == [f"moelab: error (rank 1): {why}", f"moelab: error: {why}"]  # each rank, one line


def test_upcycling_distillation_freezing_and_merging_read_and_write_sharded_checkpoints(tmp_path, capsys):
    ep2 = ("trainer=fsdp_ep", "ep=2", "trainer.devices=2", "trainer.max_epochs=1", "test=false", *LIMITS)
    # The dense twin, trained in this process and saved as a sharded folder (the layout fsdp_ep
    # runs write, as test_fsdp_ep_run_writes_once_... shows): the 2-rank runs below read it.
    from moelab.run.train import run
    from moelab.tasks.checkpoint_io import save_model_state

    run(compose_config(tmp_path / "dense_run", *LIMITS, "trainer.max_epochs=1", "test=false", "model.moe_every=0"))
    weights, config = read_model_state(str(tmp_path / "dense_run" / "checkpoints" / "last.ckpt"), "x")
    dense_ckpt = save_model_state(tmp_path / "dense", weights, config, sharded=True)
    assert (dense_ckpt / ".metadata").is_file()

    # Upcycled from the sharded dense run, distilled from it, attention frozen: 2 ranks, ep=2.
    upcycled = tmp_path / "upcycled"
    result = train_cli(upcycled, *ep2, f"init_from={dense_ckpt}", "model.upcycle=true", "model.expert_hidden=dense",
                       "expert.bias=true", f"teacher={dense_ckpt}", "task.freeze=[attention]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Upcycled 2 MoE layers" in (upcycled / "train.log").read_text()
    assert "train/distill_kl" in json.loads((upcycled / "metrics.json").read_text())
    upcycled_ckpt = upcycled / "checkpoints" / "last.ckpt"
    before, _ = read_model_state(str(dense_ckpt), "x")
    after, config = read_model_state(str(upcycled_ckpt), "x")
    attention = [k for k in before if ".attn." in k]
    assert attention and all(torch.equal(before[k], after[k]) for k in attention)  # frozen: bit-identical
    assert not torch.equal(before["vit.head.weight"], after["vit.head.weight"])  # the rest trained
    assert after["vit.blocks.1.mlp.experts.w1_EDF"].shape[0] == config["experts"] == 8

    # A sharded checkpoint merges in one process, into a sharded checkpoint that starts a run.
    merged_dir = tmp_path / "merged"
    from ..moe.test_merge import run_merge_script

    with pytest.MonkeyPatch.context() as patch:
        run_merge_script(patch, str(upcycled_ckpt), "--to", "2", "--method", "neighbour-usage", "--out", str(merged_dir))
    printed = capsys.readouterr().out
    merged = merged_dir / "merged_neighbour-usage_E2"
    assert (merged / ".metadata").is_file()
    model = load_model(str(merged), "init_from")
    assert [layer.num_experts for layer in moe_layers(model)] == [2, 2]
    weights = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in attention)  # merging touches only MoE layers
    # How to train it on (init_from reads it with the same reader as load_model).
    assert f"init_from={merged} experts=2 model.expert_hidden=128" in printed


def test_maskmoe_and_attention_heads_under_fsdp_ep_keep_the_one_process_masks(tmp_path):
    # MoA's heads stay whole on every rank (FSDP shards them like dense weights; ep splits the FFN experts only).
    lm = ("experiment=lm_pystdlib", "data.seq_len=32", "data.batch_size=4", "data.max_bytes=200000", "model.d_model=32",
          "model.ffn_hidden=64", "model.depth=2", "model.num_heads=2", "task.sample_tokens=0", "router.token_mask=frequency",
          "model.attention=moa")
    result = train_cli(tmp_path / "run", *lm, "trainer=fsdp_ep", "ep=2", "trainer.devices=2", "trainer.max_epochs=1",
                       "test=false", *LIMITS)
    assert result.returncode == 0, result.stderr[-3000:]
    saved, _ = read_model_state(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "x")
    assert saved["blocks.0.attn.experts.w_q_EDH"].shape[0] == 8
    cfg = compose_config(tmp_path / "single", *lm)
    model = model_of(cfg)
    data = instantiate(cfg.data)
    data.setup("fit")
    counts = torch.from_numpy(data.token_counts("train"))
    masked = []
    for name, module in model.named_modules():
        if hasattr(module, "fit_token_mask"):
            module.fit_token_mask(counts)
            assert torch.equal(saved[f"{name}.allowed_VE"], module.allowed_VE), name
            masked.append(name)
    assert "blocks.0.attn.router" in masked and "blocks.1.ffn.router" in masked


@pytest.fixture(scope="module")
def two_ranks_and_one(tmp_path_factory):
    """One 2-rank DDP run (batch 16 a rank) and the same run in one process (batch 32), barely
    trained (lr 1e-6, no aux loss), on an odd test set (271 images): read by the two tests
    below, which would each need the pair."""
    folder = tmp_path_factory.mktemp("two_ranks_and_one")
    common = ("loss=none", "task.lr=1e-6", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.progress=null",
              "callbacks.expert_specialisation.every_n_epochs=1", "trainer.accelerator=cpu", "trainer.num_sanity_val_steps=0",
              "data.test_fraction=0.151")
    two = train_cli(folder / "two", *common, "trainer=ddp", "trainer.devices=2", "data.batch_size=16")
    assert two.returncode == 0, two.stderr[-3000:]
    from moelab.run.train import run

    run(compose_config(folder / "one", *common, "data.batch_size=32"))  # one process, in this one
    return folder


def test_two_ranks_log_the_statistics_of_one_process_on_the_concatenated_batch(two_ranks_and_one):
    """Rank r trains on items r, r+2, … of the same permutation, so two ranks with batch 16
    see together the one process's batch of 32; their logged routing must be that batch's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moelab.callbacks.tags import LOAD_HEATMAP_TAG, specialisation_tag, tokens_per_expert_tag

    def events(run):
        accumulator = EventAccumulator(str(two_ranks_and_one / run / "tensorboard"),
                                       size_guidance={"histograms": 0, "images": 0})
        accumulator.Reload()
        return accumulator

    a, b = events("two"), events("one")
    for layer in (1, 3):
        tag = tokens_per_expert_tag(layer)
        first_a, first_b = a.Histograms(tag)[0], b.Histograms(tag)[0]  # step 1: the initial model on batch 0
        assert first_a.step == first_b.step == 1
        assert list(first_a.histogram_value.bucket) == list(first_b.histogram_value.bucket)
        assert sum(first_b.histogram_value.bucket) == 32 * 16 * 2  # images × patches × k: all 32 images
        for image_tag in (specialisation_tag(layer, "expert_class"), LOAD_HEATMAP_TAG):
            assert a.Images(image_tag)[-1].encoded_image_string == b.Images(image_tag)[-1].encoded_image_string


def test_the_strategy_turns_param_dtype_into_fsdp2s_policy():
    from moelab.parallel.strategy import FSDPExpertParallelStrategy

    policy = FSDPExpertParallelStrategy(param_dtype="bf16").mp_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert FSDPExpertParallelStrategy().mp_policy.param_dtype is None
    with pytest.raises(ConfigError, match="param_dtype=int8 must be null, bf16 or fp16"):
        FSDPExpertParallelStrategy(param_dtype="int8")


def test_two_ranks_test_every_image_once_and_equal_one_process(two_ranks_and_one):
    """An odd test set (271 images) on 2 ranks: Lightning's sampler pads rank 1 with a repeat
    of image 0; the tasks leave it out, so the test metrics equal one process's over the same
    (barely trained: lr 1e-6, two steps) model. Without that, acc and loss count image 0 twice."""
    one_metrics = json.loads((two_ranks_and_one / "one" / "metrics.json").read_text())
    two_metrics = json.loads((two_ranks_and_one / "two" / "metrics.json").read_text())
    data = DigitsDataModule(test_fraction=0.151)
    data.setup()
    assert len(data.splits["test"]) % 2 == 1
    # acc is a count over the test images: equal exactly; the loss up to the order of its sum.
    assert two_metrics["test/acc"] == one_metrics["test/acc"]
    assert abs(two_metrics["test/loss"] - one_metrics["test/loss"]) < 1e-6
