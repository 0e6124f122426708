"""Expert specialisation at validation: which classes, patch positions or token kinds each expert
takes, as heatmap images (columns = experts, each column sums to 1) and top tokens as text."""

from __future__ import annotations

import math
import string

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from moelab.callbacks.common import (
    AlsoOnTest,
    indexed_moe_layers,
    layer_order,
    sum_over_ranks,
)
from moelab.callbacks.heatmap import column_shares, render_heatmap
from moelab.callbacks.tags import specialisation_tag
from moelab.callbacks.writers import view_writers
from moelab.moe.errors import ConfigError

BYTE_CATEGORIES = ("letters", "digits", "whitespace", "punctuation", "other")
BYTE_VOCAB = 256
MODALITIES = ("auto", "vision", "language")


def byte_category_V() -> Tensor:
    """Category index (into BYTE_CATEGORIES) of each of the 256 byte values; non-ASCII is `other`."""
    category_V = torch.full((BYTE_VOCAB,), BYTE_CATEGORIES.index("other"), dtype=torch.long)
    for name, chars in (
        ("letters", string.ascii_letters),
        ("digits", string.digits),
        ("whitespace", string.whitespace),
        ("punctuation", string.punctuation),
    ):
        category_V[[ord(c) for c in chars]] = BYTE_CATEGORIES.index(name)
    return category_V


def frequency_bucket_V(token_counts_V: Tensor) -> tuple[Tensor, list[str]]:
    """Bucket of each token id by its frequency rank in `token_counts_V`: ranks 1–10, 11–100,
    101–1k, … (decades), plus `unseen` for ids that never occurred. Returns (bucket_V, labels)."""
    vocab = len(token_counts_V)
    order_V = torch.argsort(token_counts_V, descending=True, stable=True)
    rank_V = torch.empty(vocab, dtype=torch.long)
    rank_V[order_V] = torch.arange(vocab)
    bucket_V = torch.floor(torch.log10(rank_V.double() + 1).clamp_min(0) - 1e-9).clamp_min(0).long()
    unseen = token_counts_V <= 0
    num_buckets = int(bucket_V[~unseen].max()) + 1 if bool((~unseen).any()) else 0
    labels = [f"rank {1 if b == 0 else _short(10**b + 1)}–{_short(10 ** (b + 1))}" for b in range(num_buckets)]
    if unseen.any():
        bucket_V = torch.where(unseen, torch.full_like(bucket_V, num_buckets), bucket_V)
        labels.append("unseen")
    return bucket_V, labels


def _short(number: int) -> str:
    for suffix, size in (("M", 10**6), ("k", 10**3)):
        if number >= size and number % size == 0:
            return f"{number // size}{suffix}"
    return str(number)


def byte_token_name(token_id: int) -> str:
    """A readable name for a byte token: its Python repr for ASCII, hex otherwise."""
    return repr(chr(token_id)) if token_id < 128 else f"0x{token_id:02x}"


MAX_CLASS_ROWS = 50  # more classes than this: a table of each expert's top classes, not a heatmap


def top_rows_markdown(counts_RE: Tensor, names: list[str], top: int, what: str) -> str:
    """A Markdown table: each expert's `top` rows (classes, tokens) by share of its tokens."""
    lines = [f"| expert | tokens | most frequent {what} (share of the expert's tokens) |", "|---|---|---|"]
    shares_RE = column_shares(counts_RE)
    for expert in range(counts_RE.shape[1]):
        total = float(counts_RE[:, expert].sum())
        best = torch.topk(shares_RE[:, expert], min(top, counts_RE.shape[0]))
        cells = [f"{names[int(i)]} {float(v):.0%}" for v, i in zip(best.values, best.indices) if v > 0]
        cell = ", ".join(cells).replace("|", "\\|") or "(none)"
        lines.append(f"| {expert} | {total:.0f} | {cell} |")
    return "\n".join(lines)


def position_labels(num_positions: int) -> list[str]:
    """`r,c` for a square patch grid (row-major), else the plain index."""
    side = math.isqrt(num_positions)
    if side * side == num_positions:
        return [f"{p // side},{p % side}" for p in range(num_positions)]
    return [str(p) for p in range(num_positions)]


class ExpertSpecialisation(AlsoOnTest, L.Callback):
    """What each expert specialises in, measured over the validation set and written at its end.

    Vision (batch `(images (B, C, H, W), labels (B,))`, the MoE layers see B·N patch tokens
    row-major): `moe/layer<i>/expert_class` (class × expert) and `moe/layer<i>/expert_position`
    (patch position × expert). Language (batch `(ids (B, L), targets)`):
    `moe/layer<i>/expert_token_category` (letters / digits / whitespace / punctuation / other for
    a 256-byte vocabulary, frequency-rank buckets for larger ones) and the text
    `moe/layer<i>/top_tokens` (each expert's most frequent input tokens).

    Every heatmap column is one expert and sums to 1: the share of that expert's tokens in
    each row. A token counts once for each expert that processed it (k times for top-k).

    modality: `auto` (float 4-D inputs → vision, integer 2-D → language), `vision`, `language`.
    num_classes / vocab_size: default from the LightningModule (`hparams.num_classes`,
    `model.num_classes`; the first `nn.Embedding`). every_n_epochs: measure on every n-th
    validation (and always the last epoch). Only rank 0 measures (its own shard) and writes.
    """

    def __init__(
        self,
        modality: str = "auto",
        num_classes: int | None = None,
        vocab_size: int | None = None,
        top_tokens: int = 8,
        every_n_epochs: int = 1,
    ) -> None:
        if modality not in MODALITIES:
            raise ConfigError(f"callbacks.expert_specialisation.modality={modality}: pick one of {', '.join(MODALITIES)}")
        if every_n_epochs < 1:
            raise ConfigError(f"callbacks.expert_specialisation.every_n_epochs={every_n_epochs} must be >= 1")
        if top_tokens < 1:
            raise ConfigError(f"callbacks.expert_specialisation.top_tokens={top_tokens} must be >= 1")
        self.modality = modality
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.top_tokens = top_tokens
        self.every_n_epochs = every_n_epochs
        self._reset()
        self._warned_layers: set[int] = set()
        self._names: list[str] | None = None

    def _reset(self) -> None:
        self._active = False
        self._seen_modality: str | None = None
        self._counts: dict[tuple[int, str], Tensor] = {}  # (layer, table) -> rows × experts
        self._token_counts_V: Tensor | None = None

    # ---- when --------------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
        # Every rank measures its share of the validation set; the tables are summed over ranks at the end.
        self._active = not trainer.sanity_checking and self._due(trainer)

    def on_test_starts(self) -> None:
        self._active = True  # eval.py: the evaluated data is always measured

    # ---- measure -----------------------------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active:
            return
        inputs = batch[0]
        modality = self._modality_of(inputs)
        self._seen_modality = modality
        if modality == "vision":
            self._add_vision(pl_module, batch)
        else:
            self._add_language(pl_module, inputs)

    def _modality_of(self, inputs: Tensor) -> str:
        if self.modality != "auto":
            return self.modality
        if inputs.is_floating_point() and inputs.dim() == 4:
            return "vision"
        if not inputs.is_floating_point() and inputs.dim() == 2:
            return "language"
        raise ConfigError(
            f"expert specialisation cannot tell the task from a batch input of shape {tuple(inputs.shape)} "
            f"and dtype {inputs.dtype}: set callbacks.expert_specialisation.modality=vision or language"
        )

    def _tokens_per_item(self, index: int, num_tokens: int, num_items: int, expected: int | None) -> int | None:
        """Tokens per batch item a layer saw, or None (warned once) when they do not match the batch."""
        if num_tokens % num_items == 0 and (expected is None or num_tokens == expected):
            return num_tokens // num_items
        if index not in self._warned_layers:
            self._warned_layers.add(index)
            rank_zero_warn(
                f"expert specialisation skips MoE layer {index}: it routed {num_tokens} tokens, which do not "
                f"line up with a batch of {num_items} items{'' if expected is None else f' ({expected} tokens)'}"
            )
        return None

    def _add(self, key: tuple[int, str], rows_T: Tensor, num_rows: int, share_TE: Tensor) -> None:
        table = self._counts.get(key)
        if table is None or table.shape[0] < num_rows:
            grown = share_TE.new_zeros(num_rows, share_TE.shape[1])
            if table is not None:
                grown[: table.shape[0]] = table
            table = grown
        self._counts[key] = table.index_add_(0, rows_T, share_TE)

    def _add_vision(self, pl_module: L.LightningModule, batch) -> None:
        labels = batch[1].reshape(-1)
        num_items = labels.shape[0]
        num_classes = self._num_classes(pl_module, labels)
        for index, layer in indexed_moe_layers(pl_module):
            if layer.last_plan is None:
                continue
            share_TE = layer.last_plan.expert_share_TE()
            per_item = self._tokens_per_item(index, share_TE.shape[0], num_items, None)
            if per_item is None:
                continue
            labels_T = labels.to(share_TE.device).repeat_interleave(per_item)
            positions_T = torch.arange(per_item, device=share_TE.device).repeat(num_items)
            self._add((index, "expert_class"), labels_T, num_classes, share_TE)
            self._add((index, "expert_position"), positions_T, per_item, share_TE)

    def _num_classes(self, pl_module: L.LightningModule, labels: Tensor) -> int:
        for candidate in (
            self.num_classes,
            dict(getattr(pl_module, "hparams", {}) or {}).get("num_classes"),
            getattr(getattr(pl_module, "model", None), "num_classes", None),
        ):
            if candidate:
                return int(candidate)
        return int(labels.max()) + 1

    def _vocab_size(self, pl_module: L.LightningModule, ids_T: Tensor) -> int:
        if self.vocab_size:
            return int(self.vocab_size)
        embedding = next((m for m in pl_module.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is not None:
            return embedding.num_embeddings
        return max(BYTE_VOCAB, int(ids_T.max()) + 1)

    def _add_language(self, pl_module: L.LightningModule, ids: Tensor) -> None:
        ids_T = ids.reshape(-1).long()
        vocab = self._vocab_size(pl_module, ids_T)
        if int(ids_T.max()) >= vocab:
            raise ConfigError(f"token id {int(ids_T.max())} is outside a vocabulary of {vocab}: set callbacks.expert_specialisation.vocab_size")
        counts_V = torch.bincount(ids_T, minlength=vocab).double()
        self._token_counts_V = counts_V if self._token_counts_V is None else self._token_counts_V + counts_V
        for index, layer in indexed_moe_layers(pl_module):
            if layer.last_plan is None:
                continue
            share_TE = layer.last_plan.expert_share_TE()
            if self._tokens_per_item(index, share_TE.shape[0], ids.shape[0], ids_T.numel()) is None:
                continue
            self._add((index, "tokens"), ids_T.to(share_TE.device), vocab, share_TE)

    # ---- write -------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active or not self._counts:
            return
        self._sum_over_ranks(trainer)
        if not trainer.is_global_zero:
            self._reset()
            return
        writers = view_writers(trainer)
        step = trainer.global_step
        for tag, payload in self._render():
            for writer in writers:
                if isinstance(payload, str):
                    writer.add_text(tag, payload, step)
                else:
                    writer.add_image(tag, payload, step)
        self._reset()

    def _sum_over_ranks(self, trainer: L.Trainer) -> None:
        """Every table (and the token counts) summed over the ranks in one all-reduce. The
        tables have the same keys and shapes on every rank: rows are classes, positions or
        the vocabulary, which every rank knows."""
        keys = sorted(self._counts, key=lambda key: (layer_order(key[0]), key[1]))
        tensors = [self._counts[k] for k in keys]
        if self._token_counts_V is not None:
            tensors.append(self._token_counts_V)
        device = tensors[0].device
        flat = sum_over_ranks(torch.cat([t.double().flatten().to(device) for t in tensors]), trainer)
        parts = flat.split([t.numel() for t in tensors])
        for key, table, part in zip(keys, tensors, parts):
            self._counts[key] = part.view(table.shape)
        if self._token_counts_V is not None:
            self._token_counts_V = parts[-1].view(self._token_counts_V.shape)

    def _render(self):
        """(tag, image or markdown) for every table measured this validation."""
        for (index, table), counts_RE in sorted(self._counts.items(), key=lambda item: (layer_order(item[0][0]), item[0][1])):
            counts_RE = counts_RE.double().cpu()
            experts = [str(e) for e in range(counts_RE.shape[1])]
            if table == "expert_class":
                names = self._class_names(counts_RE.shape[0])
                if counts_RE.shape[0] > MAX_CLASS_ROWS:  # a 100- or 1000-row matrix is unreadable: a table
                    yield specialisation_tag(index, "top_classes"), top_rows_markdown(
                        counts_RE, names, self.top_tokens, "classes of its tokens")
                    continue
                yield specialisation_tag(index, table), render_heatmap(
                    column_shares(counts_RE), title=f"MoE layer {index}: classes each expert takes",
                    xlabel="expert", ylabel="class", colorbar_label="share of the expert's tokens",
                    row_labels=names, col_labels=experts,
                )
            elif table == "expert_position":
                yield specialisation_tag(index, table), render_heatmap(
                    column_shares(counts_RE), title=f"MoE layer {index}: patch positions each expert takes",
                    xlabel="expert", ylabel="patch position (row,col)", colorbar_label="share of the expert's tokens",
                    row_labels=position_labels(counts_RE.shape[0]), col_labels=experts,
                )
            else:
                yield from self._render_language(index, counts_RE, experts)

    def _render_language(self, index: int, counts_VE: Tensor, experts: list[str]):
        vocab = counts_VE.shape[0]
        if vocab <= BYTE_VOCAB:
            category_V, labels = byte_category_V()[:vocab], list(BYTE_CATEGORIES)
            ylabel = "byte category"
        else:
            category_V, labels = frequency_bucket_V(self._token_counts_V.cpu())
            ylabel = "token frequency rank (validation set)"
        counts_KE = torch.zeros(len(labels), counts_VE.shape[1], dtype=torch.float64).index_add_(0, category_V, counts_VE)
        yield specialisation_tag(index, "expert_token_category"), render_heatmap(
            column_shares(counts_KE), title=f"MoE layer {index}: token kinds each expert takes",
            xlabel="expert", ylabel=ylabel, colorbar_label="share of the expert's tokens",
            row_labels=labels, col_labels=experts,
        )
        yield specialisation_tag(index, "top_tokens"), self._top_tokens_markdown(counts_VE, vocab <= BYTE_VOCAB)

    def _top_tokens_markdown(self, counts_VE: Tensor, is_bytes: bool) -> str:
        names = [byte_token_name(i) if is_bytes else f"#{i}" for i in range(counts_VE.shape[0])]
        return top_rows_markdown(counts_VE, names, self.top_tokens, "input tokens")

    def _class_names(self, num_classes: int) -> list[str]:
        names = self._names or []
        return [names[c] if c < len(names) else str(c) for c in range(num_classes)]
