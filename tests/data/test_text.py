"""Text datamodules: stdlib bytes split by file, windows, token files, HF preparation errors."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest
import torch

from moelab.data import text
from moelab.data.text import HFTextDataModule, PyStdlibDataModule, RandomWindowSampler, TokenFileDataModule, split_of
from moelab.data.token_files import write_token_files
from moelab.moe import ConfigError


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    for i in range(60):
        package = root / ("pkg" if i % 3 else "") / ("test" if i % 10 == 0 else "")
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{i:02d}.py").write_text(f"# module {i}\n" + f"def f{i}(x):\n    return x + {i}\n" * 20)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_text("import this\n" * 50)
    return root


def windows_module(root, **kwargs) -> PyStdlibDataModule:
    options = dict(root=str(root), max_bytes=None, val_fraction=0.2, test_fraction=0.2, seq_len=16, batch_size=4)
    options.update(kwargs)
    module = PyStdlibDataModule(**options)
    module.setup()
    return module


def test_split_is_by_file_disjoint_and_excludes_site_packages_and_tests(fake_stdlib):
    module = windows_module(fake_stdlib)
    files = module.files
    assert all(files[s] for s in ("train", "val", "test"))
    assert not set(files["train"]) & set(files["val"]) and not set(files["train"]) & set(files["test"])
    assert not set(files["val"]) & set(files["test"])
    everything = [n for names in files.values() for n in names]
    assert not any("site-packages" in n or "/test/" in n or n.startswith("test/") for n in everything)
    assert len(everything) == 60 - 6  # six modules live in test/ folders
    for split, names in files.items():
        assert all(split_of(n, 0.2, 0.2, 0) == split for n in names)
        expected = b"".join((fake_stdlib / n).read_bytes() for n in names)
        assert len(expected) == len(module.tokens[split])
        # Same files, same bytes (order: the seeded hash order of the whole tree).
        assert sorted(expected) == sorted(module.tokens[split].tobytes())


def test_max_bytes_caps_the_text_read(fake_stdlib):
    module = windows_module(fake_stdlib, max_bytes=5000, val_fraction=0.1, test_fraction=0.1)
    one_file = max(p.stat().st_size for p in fake_stdlib.rglob("mod*.py"))
    for split, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert share * 5000 <= len(module.tokens[split]) < share * 5000 + one_file, split


def test_token_counts_count_each_splits_own_bytes(fake_stdlib):
    """token_counts(split), what MaskMoE and frequency-balanced hash routing are fitted on:
    how often each byte occurs in that split's files, counted here from the files."""
    module = windows_module(fake_stdlib)
    for split, names in module.files.items():
        counted = Counter(b for name in names for b in (fake_stdlib / name).read_bytes())
        assert module.token_counts(split).tolist() == [counted[i] for i in range(256)], split
    assert module.token_counts("train").tolist() != module.token_counts("val").tolist()


def test_eval_windows_tile_the_stream_and_targets_are_shifted_inputs(fake_stdlib):
    module = windows_module(fake_stdlib)
    stream = torch.from_numpy(module.tokens["val"].astype(np.int64))
    inputs, targets = map(torch.cat, zip(*[(x.flatten(), y.flatten()) for x, y in module.val_dataloader()]))
    assert inputs.dtype == targets.dtype == torch.int64
    n = len(inputs)
    assert n == (len(stream) - 1) // 16 * 16
    assert torch.equal(inputs, stream[:n]) and torch.equal(targets, stream[1 : n + 1])


def test_training_windows_come_from_seed_and_epoch_only(fake_stdlib):
    module = windows_module(fake_stdlib, train_steps_per_epoch=3)
    loader = module.train_dataloader()
    epoch_zero = list(loader)
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_zero, list(loader)))  # no set_epoch: same epoch
    loader.sampler.set_epoch(1)
    epoch_one = list(loader)
    assert len(epoch_one) == 3 and epoch_one[0][0].shape == (4, 16)
    assert not torch.equal(epoch_zero[0][0], epoch_one[0][0])
    x, y = epoch_one[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = windows_module(fake_stdlib, train_steps_per_epoch=3).train_dataloader()
    again.sampler.set_epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_one, list(again)))
    assert list(RandomWindowSampler(100, 5, seed=1)) != list(RandomWindowSampler(100, 5, seed=2))


def test_real_stdlib_reads_python_sources():
    module = PyStdlibDataModule(max_bytes=300_000, seq_len=64, batch_size=2)
    module.setup()
    assert module.vocab_size == 256 and module.bytes_per_token == 1.0
    assert sum(len(t) for t in module.tokens.values()) >= 300_000
    assert b"def " in module.tokens["train"].tobytes()
    assert all(name.endswith(".py") for name in module.files["train"])


def test_bad_text_configs_are_one_line(fake_stdlib):
    with pytest.raises(ConfigError, match="lower data.seq_len"):
        windows_module(fake_stdlib, seq_len=10**7)
    with pytest.raises(ConfigError, match="vocabulary is 256"):
        PyStdlibDataModule(vocab_size=50304)


def write_tokens(folder, splits, dtype=np.uint16, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        np.asarray(ids, dtype=dtype).tofile(folder / f"{split}.bin")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))


def test_token_files_are_memory_mapped_windows(tmp_path):
    ids = {s: (np.arange(300) * 7 + k) % 60000 for k, s in enumerate(("train", "val", "test"))}
    ratios = {"train": 3.5, "val": 3.0, "test": 4.0}
    write_tokens(tmp_path / "tok", ids, meta={"vocab_size": 60000, "dtype": "uint16", "bytes_per_token": ratios})
    module = TokenFileDataModule(str(tmp_path / "tok"), vocab_size=60032, seq_len=10, batch_size=2)
    module.setup()
    assert isinstance(module.tokens["train"], np.memmap)
    assert {split: module.bytes_per_token_of(split) for split in ratios} == ratios
    x, y = next(iter(module.val_dataloader()))
    assert x.dtype == torch.int64
    assert torch.equal(x[0], torch.from_numpy(ids["val"][:10].astype(np.int64)))
    assert torch.equal(y[1], torch.from_numpy(ids["val"][11:21].astype(np.int64)))
    assert int(max(b[0].max() for b in module.train_dataloader())) < 60000


def test_uint32_tokens_and_vocab_check(tmp_path):
    ids = {s: np.arange(100, dtype=np.int64) + 70000 for s in ("train", "val", "test")}
    write_tokens(tmp_path / "tok", ids, dtype=np.uint32, meta={"vocab_size": 100000, "dtype": "uint32"})
    module = TokenFileDataModule(str(tmp_path / "tok"), vocab_size=100032, seq_len=8)
    module.setup()
    assert int(next(iter(module.val_dataloader()))[0].min()) == 70000
    too_small = TokenFileDataModule(str(tmp_path / "tok"), vocab_size=50304, seq_len=8)
    with pytest.raises(ConfigError, match="set data.vocab_size=100000"):
        too_small.setup()


@pytest.mark.parametrize(
    "damage,message",
    [
        ("empty", "train.bin is empty: write it again with `python scripts/prepare_text.py --out"),
        ("odd", "train.bin has 201 bytes, not a whole number of uint16 tokens (2 bytes each)"),
        ("large_id", "train.bin holds token id 5000, outside data.vocab_size=1000: set data.vocab_size=5001 or more"),
    ],
)
def test_broken_token_files_are_one_line_errors(tmp_path, damage, message):
    ids = {s: np.arange(100) for s in ("train", "val", "test")}
    write_tokens(tmp_path / "tok", ids)
    train = tmp_path / "tok" / "train.bin"
    if damage == "empty":
        train.write_bytes(b"")
    elif damage == "odd":
        train.write_bytes(train.read_bytes() + b"\x00")
    else:
        np.asarray([1, 2, 5000] * 40, dtype=np.uint16).tofile(train)
    module = TokenFileDataModule(str(tmp_path / "tok"), vocab_size=1000, seq_len=8)
    with pytest.raises(ConfigError) as info:
        module.setup()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_token_file_names_the_prepare_command(tmp_path):
    module = TokenFileDataModule(str(tmp_path / "nowhere"), seq_len=8)
    with pytest.raises(ConfigError) as info:
        module.setup()
    message = str(info.value)
    assert "\n" not in message and "train.bin not found" in message
    assert f"python scripts/prepare_text.py --out {tmp_path / 'nowhere'}" in message


def test_missing_hf_extra_names_the_install_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        text.importlib.util, "find_spec", lambda name, *a: None if name in ("datasets", "tiktoken") else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as info:
        HFTextDataModule(str(tmp_path / "hf"))
    message = str(info.value)
    assert "\n" not in message and 'pip install -e ".[hf]"' in message and "needs the datasets package" in message


def test_a_pooled_bytes_per_token_from_an_older_meta_json_warns(tmp_path):
    ids = {s: np.arange(300) % 500 for s in ("train", "val", "test")}
    write_tokens(tmp_path / "tok", ids, meta={"vocab_size": 500, "dtype": "uint16", "bytes_per_token": 3.5})
    module = TokenFileDataModule(str(tmp_path / "tok"), vocab_size=512, seq_len=10, batch_size=2)
    with pytest.warns(UserWarning, match="pooled over all splits"):
        module.setup()
    assert module.bytes_per_token_of("val") == 3.5


def test_write_token_files_round_trip_and_bytes_per_token(tmp_path):
    docs = {"train": ["héllo wörld", "abc"], "val": ["xyz"], "test": ["12"]}

    def encode_pairs(batch):  # two UTF-8 bytes per token (a stand-in tokenizer)
        return [[sum(pair) for pair in zip(t.encode()[::2], t.encode()[1::2] + b"\0")] for t in batch]

    meta = write_token_files(docs, encode_pairs, tmp_path / "out", vocab_size=512, end_of_text=511, chunk_docs=1)
    assert meta["dtype"] == "uint16"
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).tolist()
    assert train == encode_pairs(["héllo wörld"])[0] + [511] + encode_pairs(["abc"])[0] + [511]
    for split, texts in docs.items():  # each split its own ratio; an end-of-text counts as 1 byte
        split_bytes = sum(len(t.encode()) + 1 for t in texts)
        split_tokens = sum(len(ids) + 1 for ids in encode_pairs(texts))
        assert meta["bytes_per_token"][split] == pytest.approx(split_bytes / split_tokens)
        assert meta["splits"][split] == {"bytes": split_bytes, "tokens": split_tokens, "documents": len(texts)}
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_every_ddp_rank_gets_train_steps_per_epoch_batches(fake_stdlib):
    from types import SimpleNamespace

    module = windows_module(fake_stdlib, train_steps_per_epoch=3)
    single = list(module.train_dataloader().sampler)
    assert len(single) == 3 * 4
    ranks = []
    for rank in range(2):
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        ranks.append(list(module.train_dataloader().sampler))
    assert [len(r) for r in ranks] == [3 * 4, 3 * 4]
    assert ranks[0] != ranks[1]  # each rank its own windows
