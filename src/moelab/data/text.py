"""Text for language models as windows of token ids: Python's stdlib as bytes, memory-mapped
token files (nanoGPT style), and Hugging Face datasets tokenised with tiktoken.

Batches are `(inputs, targets)`, both (B, L) int64, targets the inputs shifted by one.
Training draws random windows (seeded); validation and test read fixed consecutive windows.
Token files are written by moelab.data.token_files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moelab.data.sampling import (  # noqa: F401 - RandomWindowSampler is part of this module's API
    RandomWindowSampler,
    ResumableDataModule,
    check_loader_args,
    evaluation_loader,
    world_of,
)
from moelab.data.token_files import SPLITS, TOKEN_DTYPES, prepare_text_tokens, require_datasets
from moelab.moe.errors import ConfigError

TEST_DIRS = frozenset({"test", "tests", "idle_test"})


class TokenWindows(Dataset):
    """Item i: the window tokens[starts[i] : starts[i] + L + 1] as (inputs, targets) of length L."""

    def __init__(self, tokens: np.ndarray, seq_len: int, starts: np.ndarray) -> None:
        self.tokens, self.seq_len, self.starts = tokens, seq_len, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1]).astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(ResumableDataModule):
    """Shared windowing for token streams; subclasses provide `load_splits()` (split → 1-D ids).

    seq_len: tokens per input window. train_steps_per_epoch: batches per training epoch
    (the data are sampled, so an epoch is a chosen length). eval_max_windows: cap on the
    consecutive windows of val/test (null: all).
    """

    vocab_size: int = 256
    bytes_per_token: float | None = None

    def __init__(
        self,
        seq_len: int = 256,
        batch_size: int = 32,
        train_steps_per_epoch: int = 200,
        eval_batch_size: int | None = None,
        eval_max_windows: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if eval_batch_size is not None:
            check_loader_args(eval_batch_size, num_workers, "data.eval_batch_size")
        if seq_len < 1 or train_steps_per_epoch < 1:
            raise ConfigError(
                f"data.seq_len={seq_len} and data.train_steps_per_epoch={train_steps_per_epoch} must both be >= 1"
            )
        self.seq_len, self.batch_size, self.train_steps_per_epoch = seq_len, batch_size, train_steps_per_epoch
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_max_windows, self.seed, self.num_workers = eval_max_windows, seed, num_workers
        self.tokens: dict[str, np.ndarray] = {}

    def load_splits(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def token_counts(self, split: str = "train") -> np.ndarray:
        """How often each token id occurs in `split` (length: the vocabulary size), counted
        in chunks so a memory-mapped split is never held in memory whole."""
        tokens, chunk = self.tokens[split], 1 << 24
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, len(tokens), chunk):
            counts += np.bincount(tokens[start : start + chunk], minlength=self.vocab_size)[: self.vocab_size]
        return counts

    def bytes_per_token_of(self, split: str) -> float | None:
        """Bytes of original text per token in `split` (for bits per byte), or None if unknown.
        `bytes_per_token` is one number for every split, or a {split: ratio} mapping."""
        value = self.bytes_per_token
        if isinstance(value, Mapping):
            value = value.get(split)
        return None if value is None else float(value)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (bytes decoded as UTF-8 here; token files override)."""
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def setup(self, stage: str | None = None) -> None:
        if self.tokens:
            return
        self.tokens = self.load_splits()
        for split, ids in self.tokens.items():
            if len(ids) < self.seq_len + 1:
                raise ConfigError(
                    f"the {split} split has {len(ids)} tokens, fewer than data.seq_len+1={self.seq_len + 1}: "
                    "lower data.seq_len or give it more text"
                )

    def _eval_windows(self, split: str) -> TokenWindows:
        tokens = self.tokens[split]
        starts = np.arange(0, len(tokens) - self.seq_len, self.seq_len)
        if self.eval_max_windows is not None:
            starts = starts[: self.eval_max_windows]
        return TokenWindows(tokens, self.seq_len, starts)

    def train_dataloader(self) -> DataLoader:
        tokens = self.tokens["train"]
        windows = TokenWindows(tokens, self.seq_len, np.arange(len(tokens) - self.seq_len))
        # Every rank draws its own `train_steps_per_epoch` batches of windows.
        world_size, rank = world_of(self.trainer)
        num_samples = self.train_steps_per_epoch * self.batch_size
        sampler = RandomWindowSampler(len(windows), num_samples, self.seed, world_size, rank)
        return self.training_loader(windows, sampler, self.batch_size, self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self._eval_windows("val"), self.eval_batch_size, self.num_workers, self.seed, self.trainer)

    def test_dataloader(self) -> DataLoader:
        return evaluation_loader(self._eval_windows("test"), self.eval_batch_size, self.num_workers, self.seed, self.trainer)


def split_of(name: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """Split of a file by a hash of its name: independent of file order and of the other files."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def stdlib_sources(root: Path, include_tests: bool = False) -> list[Path]:
    """The standard library's `.py` files under `root`, sorted; never site-packages."""
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "dist-packages") or "__pycache__" in parts:
            continue
        if not include_tests and TEST_DIRS.intersection(parts[:-1]):
            continue
        files.append(path)
    return sorted(files)


@functools.lru_cache(maxsize=4)
def load_stdlib_bytes(
    root: str, max_bytes: int | None, val_fraction: float, test_fraction: float, split_seed: int, include_tests: bool
) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """Split → (concatenated bytes as uint8, the relative paths in it).

    Each file belongs to the split a seeded hash of its path picks. With `max_bytes`, files
    are taken in the order of another seeded hash until each split holds its share
    (val_fraction, test_fraction, the rest for train) of `max_bytes`; files stay whole.
    """
    root_path = Path(root)
    files = stdlib_sources(root_path, include_tests)
    if not files:
        raise ConfigError(f"no .py files under {root}: set data.root to a Python standard library folder")
    names = [p.relative_to(root_path).as_posix() for p in files]
    order = sorted(range(len(files)), key=lambda i: hashlib.sha256(f"{split_seed}:order:{names[i]}".encode()).digest())
    budget = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    budget = {split: None if max_bytes is None else share * max_bytes for split, share in budget.items()}
    chunks: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    chosen: dict[str, list[str]] = {split: [] for split in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for i in order:
        split = split_of(names[i], val_fraction, test_fraction, split_seed)
        if budget[split] is not None and size[split] >= budget[split]:
            continue
        text = files[i].read_bytes()
        chunks[split].append(text)
        chosen[split].append(names[i])
        size[split] += len(text)
    return {
        split: (np.frombuffer(b"".join(chunks[split]), dtype=np.uint8), tuple(chosen[split])) for split in SPLITS
    }


class PyStdlibDataModule(TextDataModule):
    """The running Python's standard-library sources as bytes (vocabulary 256), offline.

    Files are assigned to train / val / test by a seeded hash of their relative path, so
    validation text comes from files never trained on; `max_bytes` caps the total read.
    """

    vocab_size = 256
    bytes_per_token = 1.0

    def __init__(
        self,
        root: str | None = None,
        vocab_size: int = 256,
        max_bytes: int | None = 4_000_000,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        include_tests: bool = False,
        **window_kwargs,
    ) -> None:
        super().__init__(**window_kwargs)
        if vocab_size != 256:
            raise ConfigError(f"data.vocab_size={vocab_size}: pystdlib is bytes, its vocabulary is 256")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ConfigError("data.val_fraction and data.test_fraction must be > 0 and sum to < 1")
        self.root = root or sysconfig.get_paths()["stdlib"]
        self.max_bytes, self.val_fraction, self.test_fraction = max_bytes, val_fraction, test_fraction
        self.split_seed, self.include_tests = split_seed, include_tests
        self.files: dict[str, tuple[str, ...]] = {}

    def load_splits(self) -> dict[str, np.ndarray]:
        loaded = load_stdlib_bytes(
            self.root, self.max_bytes, self.val_fraction, self.test_fraction, self.split_seed, self.include_tests
        )
        self.files = {split: names for split, (_, names) in loaded.items()}
        return {split: data for split, (data, _) in loaded.items()}


def _prepare_hint(path: Path) -> str:
    return f"python scripts/prepare_text.py --out {path}"


class TokenFileDataModule(TextDataModule):
    """Token ids in `<path>/{train,val,test}.bin` (raw uint16 or uint32 arrays, nanoGPT style),
    memory-mapped. An optional `<path>/meta.json` ({vocab_size, dtype, bytes_per_token,
    encoding}) written by `scripts/prepare_text.py` fills in what the config leaves null;
    its `bytes_per_token` holds one ratio per split. A `bytes_per_token` set in the config
    applies to every split."""

    def __init__(
        self,
        path: str,
        dtype: str | None = None,
        vocab_size: int = 50304,
        bytes_per_token: float | None = None,
        **window_kwargs,
    ) -> None:
        super().__init__(**window_kwargs)
        self.path = Path(path)
        self.meta: dict = {}
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.bytes_per_token = bytes_per_token
        self._encoding = None

    def _read_meta(self) -> None:
        meta_file = self.path / "meta.json"
        self.meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self.dtype = self.dtype or self.meta.get("dtype", "uint16")
        if self.dtype not in TOKEN_DTYPES:
            raise ConfigError(f"data.dtype={self.dtype} is not a token file type: use uint16 or uint32")
        if self.bytes_per_token is None:
            self.bytes_per_token = self.meta.get("bytes_per_token")
            if isinstance(self.bytes_per_token, (int, float)):
                warnings.warn(
                    f"{self.path}/meta.json has one bytes-per-token ratio pooled over all splits, so val/test bpb "
                    f"use the pooled ratio: write the files again with `{_prepare_hint(self.path)}` for per-split ratios",
                    stacklevel=2,
                )
        needed = self.meta.get("vocab_size")
        if needed is not None and needed > self.vocab_size:
            raise ConfigError(
                f"{self.path}/meta.json says the tokenizer has {needed} ids but data.vocab_size={self.vocab_size}: "
                f"set data.vocab_size={needed} or more"
            )

    def load_splits(self) -> dict[str, np.ndarray]:
        for split in SPLITS:
            if not (self.path / f"{split}.bin").exists():
                raise ConfigError(
                    f"{self.path / f'{split}.bin'} not found: write the token files with `{_prepare_hint(self.path)}`"
                )
        self._read_meta()
        return {split: self._open_tokens(self.path / f"{split}.bin") for split in SPLITS}

    def _open_tokens(self, file: Path) -> np.ndarray:
        """Memory-map a token file after checking what would otherwise fail deep inside
        training: an empty file, a size that is not whole tokens, ids outside the vocabulary."""
        dtype = np.dtype(TOKEN_DTYPES[self.dtype])
        size = file.stat().st_size
        if size == 0:
            raise ConfigError(f"{file} is empty: write it again with `{_prepare_hint(self.path)}`")
        if size % dtype.itemsize:
            raise ConfigError(
                f"{file} has {size} bytes, not a whole number of {self.dtype} tokens ({dtype.itemsize} bytes each): "
                "the file is truncated or data.dtype is wrong"
            )
        tokens = np.memmap(file, dtype=dtype, mode="r")
        largest = int(tokens.max())
        if largest >= self.vocab_size:
            raise ConfigError(
                f"{file} holds token id {largest}, outside data.vocab_size={self.vocab_size}: "
                f"set data.vocab_size={largest + 1} or more (or check data.dtype={self.dtype})"
            )
        return tokens

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        name = self.meta.get("encoding")
        if name and importlib.util.find_spec("tiktoken") is not None:
            if self._encoding is None:
                import tiktoken

                self._encoding = tiktoken.get_encoding(name)
            return self._encoding.decode(ids)
        return " ".join(map(str, ids))


class HFTextDataModule(TokenFileDataModule):
    """A text dataset, from the Hugging Face Hub or local text/jsonl/parquet/csv files
    (`data_files`), tokenised once into token files under `path` (by `prepare_data`, on the
    first run; interrupted, it resumes), then read as `data=tokens` reads them. The
    tokenizer comes from the `tokenizer` group (bytes, tiktoken, hf); a token folder made
    with another tokenizer is refused in one line."""

    def __init__(
        self,
        path: str,
        dataset: str | None = "Salesforce/wikitext",
        name: str | None = "wikitext-103-raw-v1",
        data_files: Mapping[str, str | list[str]] | None = None,
        text_field: str = "text",
        splits: Mapping[str, str] | None = None,
        tokenizer: Mapping | None = None,
        max_docs: int | None = None,
        streaming: bool = False,
        **token_kwargs,
    ) -> None:
        super().__init__(path, **token_kwargs)
        self.source = dict(dataset=dataset, name=name, data_files=data_files, text_field=text_field, splits=splits,
                           max_docs=max_docs, streaming=streaming)
        self.tokenizer_spec = {"kind": "tiktoken", "name": "gpt2", **dict(tokenizer or {})}
        if not self._prepared():
            require_datasets()

    def _prepared(self) -> bool:
        return all((self.path / f"{split}.bin").exists() for split in SPLITS) and (self.path / "meta.json").exists()

    def tokenizer(self):
        from moelab.data.tokenization import make_tokenizer

        return make_tokenizer(self.tokenizer_spec["kind"], self.tokenizer_spec.get("name"))

    def prepare_data(self) -> None:
        if not self._prepared():
            prepare_text_tokens(self.path, self.tokenizer(), **self.source)

    def _read_meta(self) -> None:
        super()._read_meta()
        made_with = self.meta.get("tokenizer")
        wanted = {"kind": self.tokenizer_spec["kind"], "name": self.tokenizer_spec.get("name")}

        def key(spec: Mapping) -> tuple:  # an hf tokenizer path may be spelled another way: compare its file name
            name = spec.get("name")
            return spec["kind"], Path(str(name)).name if spec["kind"] == "hf" and name else name

        if made_with is not None and key(made_with) != key(wanted):
            raise ConfigError(f"{self.path} holds tokens made by {made_with['kind']}:{made_with['name']}, not "
                              f"{wanted['kind']}:{wanted['name']}: point data.path at another folder for this tokenizer")

    def decode(self, ids: Iterable[int]) -> str:
        if self._encoding is None:
            self._encoding = self.tokenizer()
        return self._encoding.decode([int(i) for i in ids])
