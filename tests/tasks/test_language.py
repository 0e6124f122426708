"""The language task end to end through `run(cfg)` (experiment=lm_pystdlib, a few CPU steps),
its metric equations, the TensorBoard sample, and the one-line refusal of a capacity router."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moelab.run.train import run

from ..conftest import compose_config

TINY = (
    "experiment=lm_pystdlib",
    "debug=default",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.max_bytes=200000",
    "data.seq_len=32",
    "data.batch_size=4",
    "model.d_model=32",
    "model.ffn_hidden=64",
    "model.depth=2",
    "model.num_heads=2",
    "task.sample_tokens=8",
    "callbacks.progress=null",
)


def test_lm_pystdlib_runs_and_reports_bits_per_byte(tmp_path):
    value = run(compose_config(tmp_path, *TINY))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == metrics["val/bpb"]
    for stage in ("val", "test"):
        loss = metrics[f"{stage}/loss"]
        assert 0 < loss < 2 * math.log(256)
        assert metrics[f"{stage}/bpb"] == pytest.approx(loss / math.log(2), rel=1e-5)
        assert metrics[f"{stage}/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    for name in ("train/loss", "train/ce", "train/aux/balance", "train/aux/zloss"):
        assert name in metrics, name
    assert metrics["train/loss"] > metrics["train/ce"]  # the auxiliary losses are added
    assert "train/tokens_per_s" not in metrics  # a wall-clock reading: TensorBoard only, runs stay comparable

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))
    samples = events.Tensors("samples/continuation/text_summary")
    assert len(samples) == 1
    text = samples[0].tensor_proto.string_val[0].decode()
    assert "⟦" in text and text.rstrip().endswith("⟧")


def test_bits_per_byte_use_each_splits_own_bytes_per_token(tmp_path):
    """Token files whose splits tokenise differently: val and test bpb divide by their own ratio."""
    from moelab.data.token_files import write_token_files

    def encode(batch):  # val text packs 4 bytes per token, the rest 2
        return [[ord(c) % 500 for c in (t[::4] if t.startswith("v") else t[::2])] for t in batch]

    docs = {split: [split[0] + "abcdefgh" * 40] * 40 for split in ("train", "val", "test")}
    meta = write_token_files(docs, encode, tmp_path / "tok", vocab_size=512, end_of_text=511)
    ratios = meta["bytes_per_token"]
    assert ratios["val"] > 1.5 * ratios["test"]
    tiny = [o for o in TINY if not o.startswith(("experiment=", "data.max_bytes"))]
    cfg = compose_config(tmp_path, "model=lm", "data=tokens", "task=language", "optimized_metric=val/bpb",
                         f"data.path={tmp_path / 'tok'}", "data.vocab_size=512", "data.eval_max_windows=4", *tiny)
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for stage in ("val", "test"):
        assert metrics[f"{stage}/bpb"] == pytest.approx(metrics[f"{stage}/loss"] / (math.log(2) * ratios[stage]), rel=1e-5)


def test_dense_baseline_is_one_override(tmp_path):
    cfg = compose_config(tmp_path, *TINY, "model.moe_every=0", "trainer.limit_train_batches=2")
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "val/bpb" in metrics and not any(name.startswith("train/aux/") for name in metrics)


def test_capacity_router_stops_with_one_line(tmp_path):
    cfg = compose_config(tmp_path, *TINY, "router=switch")
    with pytest.raises(SystemExit) as info:
        run(cfg)
    message = str(info.value)
    assert message.startswith("moelab: error: model=lm: the router of MoE layer")
    assert "future tokens would leak" in message and "\n" not in message


def test_weight_decay_skips_normalised_embeddings():
    from functools import partial

    from moelab.moe import CosineRouter, GroupedExperts, MoELayer
    from moelab.tasks.optim import adamw_param_groups

    layer = MoELayer(8, 16, partial(CosineRouter, k=2), partial(GroupedExperts, num_experts=4))
    decay, no_decay = adamw_param_groups(layer, 0.1)
    assert any(p is layer.router.expert_embeddings for p in no_decay["params"])
    assert any(p is layer.router.project.weight for p in decay["params"])


def test_training_flops_per_token_and_the_peak_table(monkeypatch):
    from moelab.tasks import throughput

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))  # 40 embedding + 15 weights
    assert throughput.training_flops_per_token(model, depth=2, width=4, seq_len=8, causal=True) == 6 * 15 + 6 * 2 * 8 * 4
    assert throughput.training_flops_per_token(model, depth=2, width=4, seq_len=8, causal=False) == 6 * 15 + 12 * 2 * 8 * 4
    tied = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    tied.head.weight = tied.embed.weight  # a tied head: its matmul counts, once
    assert throughput.training_flops_per_token(tied, depth=1, width=4, seq_len=8, causal=True) == 6 * 40 + 6 * 8 * 4
    assert throughput.peak_flops(torch.device("cpu")) is None
    for name, tflops in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA A100-SXM4-80GB", 312),
                         ("NVIDIA GeForce GTX 1080", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert throughput.peak_flops(torch.device("cuda", 0)) == (tflops and tflops * 1e12), name
