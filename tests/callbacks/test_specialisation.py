"""ExpertSpecialisation on a language model: a small fake LM (embedding → MoELayer → head) on
byte and larger vocabularies, read back from the event files; the category helpers."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moelab.callbacks import ExpertCollapseAlarm, ExpertSpecialisation, ExpertUtilisation
from moelab.callbacks import specialisation
from moelab.callbacks.heatmap import heatmap_size, render_heatmap
from moelab.callbacks.specialisation import BYTE_CATEGORIES, byte_category_V, byte_token_name, frequency_bucket_V
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


def routed_layer(layer_index: int) -> MoELayer:
    """A top-2 MoE layer over EXPERTS experts, capacity-limited so some choices are dropped
    (a dropped choice is not a token the expert processed)."""
    return MoELayer(16, 32, router=partial(TopKRouter, num_experts=EXPERTS, k=2, capacity_factor=1.0),
                    experts=partial(GroupedExperts, num_experts=EXPERTS), layer_index=layer_index)


def processed(plan, t: int) -> list[int]:
    """The experts that processed token t: its kept choices, read from the plan one by one."""
    kept = plan.kept_TK
    return [int(e) for k, e in enumerate(plan.selected_experts_TK[t]) if kept is None or bool(kept[t, k])]


def recorded_heatmaps(monkeypatch) -> dict[str, dict]:
    """What the callback hands to render_heatmap, by title: the matrix and the labels."""
    calls = {}

    def record(values, **kwargs):
        calls[kwargs["title"]] = dict(values=values, **kwargs)
        return np.zeros((3, 1, 1), dtype=np.uint8)

    monkeypatch.setattr(specialisation, "render_heatmap", record)
    return calls


class TinyMoEViT(nn.Module):
    """Images of PATCHES patch tokens through one MoE layer (block 1), batch-major as the ViT's."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = routed_layer(layer_index=1)

    def forward(self, images):
        return self.moe(images.flatten(2).transpose(1, 2))  # (B, C=16, 2, 2) -> (B, 4 patches, 16)


def test_vision_tables_count_each_class_and_patch_position_per_expert(monkeypatch):
    """Counted here token by token: token t of a batch of B images belongs to image t // N
    (its class) at patch t % N, once for each expert that processed it. The class × expert and
    position × expert heatmaps are those counts as column shares, experts in order. Labels
    spread over tokens image by image (not cycled over the batch), experts not reversed."""
    torch.manual_seed(0)
    module, num_classes, patches = TinyMoEViT(), 5, 4
    callback = ExpertSpecialisation(num_classes=num_classes)
    batches = [(torch.randn(6, 16, 2, 2), torch.tensor([0, 1, 2, 3, 4, 1])),
               (torch.randn(3, 16, 2, 2), torch.tensor([4, 4, 2]))]
    classes, positions = torch.zeros(num_classes, EXPERTS), torch.zeros(patches, EXPERTS)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, max_epochs=1, datamodule=None)
    callback.on_validation_epoch_start(trainer, module)
    for index, (images, labels) in enumerate(batches):
        module(images)
        callback.on_validation_batch_end(trainer, module, None, (images, labels), index)
        for t in range(images.shape[0] * patches):
            for expert in processed(module.moe.last_plan, t):
                classes[labels[t // patches], expert] += 1
                positions[t % patches, expert] += 1
    assert classes.sum() < 2 * 9 * patches  # some choices were dropped: they do not count
    torch.testing.assert_close(callback._counts[(1, "expert_class")].float(), classes)
    torch.testing.assert_close(callback._counts[(1, "expert_position")].float(), positions)
    heatmaps = recorded_heatmaps(monkeypatch)
    tags = [tag for tag, _ in callback._render()]
    assert tags == [specialisation_tag(1, "expert_class"), specialisation_tag(1, "expert_position")]
    for title, counts in (("classes each expert takes", classes), ("patch positions each expert takes", positions)):
        (drawn,) = [h for t, h in heatmaps.items() if title in t]
        assert drawn["col_labels"] == [str(e) for e in range(EXPERTS)]
        torch.testing.assert_close(torch.as_tensor(drawn["values"]).float(), counts / counts.sum(0, keepdim=True))


def test_language_tables_count_each_token_and_byte_kind_per_expert(monkeypatch):
    """The tokens × expert counts, the byte-kind heatmap and the top-tokens table of a byte LM,
    against counts made here token by token, with the byte kinds taken from Python's string
    constants."""
    import string

    torch.manual_seed(0)
    model = TinyMoELM(256)
    model.moe.layer_index = 0
    callback = ExpertSpecialisation(top_tokens=2)
    text = torch.tensor(list(b"def f(x):\n    return x + 42  # ok\n"[:32]) * 2).view(2, 32)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, max_epochs=1, datamodule=None)
    callback.on_validation_epoch_start(trainer, model)
    model(text)
    callback.on_validation_batch_end(trainer, model, None, (text, text), 0)
    kinds = {"letters": string.ascii_letters, "digits": string.digits, "whitespace": string.whitespace,
             "punctuation": string.punctuation}
    tokens, per_kind = torch.zeros(256, EXPERTS), torch.zeros(len(BYTE_CATEGORIES), EXPERTS)
    for t, byte in enumerate(text.reshape(-1).tolist()):
        kind = next((name for name, chars in kinds.items() if chr(byte) in chars), "other")
        for expert in processed(model.moe.last_plan, t):
            tokens[byte, expert] += 1
            per_kind[BYTE_CATEGORIES.index(kind), expert] += 1
    torch.testing.assert_close(callback._counts[(0, "tokens")].float(), tokens)
    heatmaps = recorded_heatmaps(monkeypatch)
    rendered = dict(callback._render())
    (drawn,) = heatmaps.values()
    assert drawn["col_labels"] == [str(e) for e in range(EXPERTS)] and drawn["row_labels"] == list(BYTE_CATEGORIES)
    shares = per_kind / per_kind.sum(0, keepdim=True).clamp_min(1)
    torch.testing.assert_close(torch.as_tensor(drawn["values"]).float(), shares)
    rows = rendered[specialisation_tag(0, "top_tokens")].splitlines()[2:]
    assert [row.split(" | ")[:2] for row in rows] == [[f"| {e}", f"{int(tokens[:, e].sum())}"] for e in range(EXPERTS)]
    for e, row in enumerate(rows):  # each expert's most frequent token first, with its share
        name, share = row.split(" | ")[2].split(", ")[0].removesuffix(" |").rsplit(" ", 1)
        most = tokens[:, e].max()
        assert name in {byte_token_name(b) for b in range(256) if tokens[b, e] == most}
        assert share == f"{most / tokens[:, e].sum():.0%}"


def test_a_heatmap_draws_row_r_col_c_where_the_axes_say():
    """One bright cell at (row 0, col 3), then one at (row 2, col 0): the pixels that differ
    between the two images sit, for the first, right of and above those of the second
    (matplotlib's image origin at the top; columns in order)."""
    bright = np.array([253, 231, 37])  # viridis at its maximum
    centres = []
    for row, col in ((0, 3), (2, 0)):
        values = torch.zeros(3, 4)
        values[row, col] = 1.0
        image = render_heatmap(values, title="t", xlabel="expert", ylabel="class", colorbar_label="share",
                               row_labels=["a", "b", "c"], col_labels=["0", "1", "2", "3"])
        centres.append(image.transpose(1, 2, 0).astype(int))
    first, second = centres
    only_first = (np.abs(first - bright).sum(-1) < 30) & (np.abs(second - bright).sum(-1) >= 30)
    only_second = (np.abs(second - bright).sum(-1) < 30) & (np.abs(first - bright).sum(-1) >= 30)
    (y1, x1), (y2, x2) = (np.argwhere(mask).mean(0) for mask in (only_first, only_second))
    assert only_first.sum() > 100 and only_second.sum() > 100
    assert x1 > x2 and y1 < y2
