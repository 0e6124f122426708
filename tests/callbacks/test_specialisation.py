"""ExpertSpecialisation on a language model: a small fake LM (embedding → MoELayer → head) on
byte and larger vocabularies, read back from the event files; the category helpers."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moelab.callbacks import ExpertCollapseAlarm, ExpertSpecialisation, ExpertUtilisation
from moelab.callbacks.heatmap import heatmap_size
from moelab.callbacks.specialisation import BYTE_CATEGORIES, byte_category_V, frequency_bucket_V
from moelab.callbacks.tags import specialisation_tag, tokens_per_expert_tag
from moelab.moe import ConfigError, GroupedExperts, MoELayer, TopKRouter

from .events import load_events, text_tags

EXPERTS, SEQ, BATCH = 4, 12, 8


class TinyMoELM(L.LightningModule):
    """Any LightningModule whose model holds MoELayers and whose batch is (ids, targets)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.moe = MoELayer(
            16, 32, router=partial(TopKRouter, num_experts=EXPERTS, k=2),
            experts=partial(GroupedExperts, num_experts=EXPERTS), aux_loss_weights={"balance": 0.01},
        )
        self.head = nn.Linear(16, vocab_size)

    def forward(self, ids):
        return self.head(self.moe(self.embed(ids)))

    def _loss(self, batch):
        ids, targets = batch
        return F.cross_entropy(self(ids).flatten(0, 1), targets.flatten()) + self.moe.aux_loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def byte_batches(text: bytes, num_sequences: int) -> TensorDataset:
    data = torch.tensor(list(text * (num_sequences * (SEQ + 1) // len(text) + 1)), dtype=torch.long)
    windows = data[: num_sequences * (SEQ + 1)].view(num_sequences, SEQ + 1)
    return TensorDataset(windows[:, :-1], windows[:, 1:])


def fit_tiny_lm(tmp_path, vocab_size: int, dataset: TensorDataset, **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=2, log_every_n_steps=2,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[ExpertUtilisation(), ExpertSpecialisation(top_tokens=3), ExpertCollapseAlarm()],
        **trainer_kwargs,
    )
    loader = DataLoader(dataset, batch_size=BATCH)
    trainer.fit(TinyMoELM(vocab_size), train_dataloaders=loader, val_dataloaders=loader)
    return load_events(tmp_path / "tb")


def test_byte_lm_gets_token_category_heatmap_and_top_tokens(tmp_path):
    text = b"def add(a, b):\n    return a + b  # 42\n\xc3\xa9"
    events = fit_tiny_lm(tmp_path, 256, byte_batches(text, 6 * BATCH))

    (image,) = events.Images(specialisation_tag(0, "expert_token_category"))
    assert (image.height, image.width) == heatmap_size(len(BYTE_CATEGORIES), EXPERTS)
    assert text_tags(events) == [specialisation_tag(0, "top_tokens")]
    (text_event,) = events.Tensors(specialisation_tag(0, "top_tokens") + "/text_summary")
    table = text_event.tensor_proto.string_val[0].decode()
    assert table.count("\n") == 1 + EXPERTS and "| 0 |" in table
    # logging steps follow trainer.log_every_n_steps=2: steps 2 and 4 of 4
    assert [e.step for e in events.Histograms(tokens_per_expert_tag(0))] == [2, 4]
    for event in events.Histograms(tokens_per_expert_tag(0)):
        assert sum(event.histogram_value.bucket) == BATCH * SEQ * 2


def test_large_vocabulary_uses_frequency_buckets(tmp_path):
    vocab = 3000
    ids = torch.randint(0, vocab, (6 * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    events = fit_tiny_lm(tmp_path, vocab, TensorDataset(ids[:, :-1], ids[:, 1:]))
    (image,) = events.Images(specialisation_tag(0, "expert_token_category"))
    assert image.width == heatmap_size(1, EXPERTS)[1]


def test_byte_categories():
    category_V = byte_category_V()
    names = [BYTE_CATEGORIES[int(category_V[b])] for b in b"aZ7 \n.#\x00"] + [BYTE_CATEGORIES[int(category_V[200])]]
    assert names == ["letters", "letters", "digits", "whitespace", "whitespace", "punctuation", "punctuation", "other", "other"]


def test_frequency_buckets_are_rank_decades_plus_unseen():
    counts_V = torch.zeros(200)
    counts_V[:150] = torch.arange(150, 0, -1).double()  # id 0 most frequent; ids 150.. unseen
    bucket_V, labels = frequency_bucket_V(counts_V)
    assert labels == ["rank 1–10", "rank 11–100", "rank 101–1k", "unseen"]
    assert bucket_V[:10].tolist() == [0] * 10 and bucket_V[10:100].eq(1).all() and bucket_V[100:150].eq(2).all()
    assert bucket_V[150:].eq(3).all()


def test_unknown_modality_and_unreadable_batch_are_config_errors():
    with pytest.raises(ConfigError, match="modality=text: pick one of auto, vision, language"):
        ExpertSpecialisation(modality="text")
    with pytest.raises(ConfigError, match="cannot tell the task"):
        ExpertSpecialisation()._modality_of(torch.zeros(2, 3, 4))


def test_many_classes_become_a_table_of_each_experts_top_classes():
    callback = ExpertSpecialisation(top_tokens=2)
    counts = torch.zeros(60, EXPERTS)
    for expert in range(EXPERTS):
        counts[10 * expert, expert], counts[10 * expert + 1, expert] = 30.0, 10.0  # expert e: classes 10e, 10e+1
    callback._counts = {(1, "expert_class"): counts}
    callback._names = [f"class{c}" for c in range(60)]
    ((tag, table),) = list(callback._render())
    assert tag == specialisation_tag(1, "top_classes") and isinstance(table, str)
    assert "| 2 | 40 | class20 75%, class21 25% |" in table.splitlines()
    callback._counts = {(1, "expert_class"): counts[:10]}
    ((tag, image),) = list(callback._render())
    assert tag == specialisation_tag(1, "expert_class") and image.shape[0] == 3  # a heatmap image (C, H, W)
