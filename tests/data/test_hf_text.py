"""Text from local files through `datasets`, tokenised by a BPE trained here with
`tokenizers` (offline), or by bytes: token files with per-split bytes per token, resumable
preparation, and a few LM steps whose bpb uses the split's own ratio."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from moelab.data.text import HFTextDataModule
from moelab.data.token_files import write_token_files
from moelab.data.tokenization import make_tokenizer
from moelab.moe.errors import ConfigError
from moelab.run.train import run

from ..conftest import LM_FAST, ROOT, compose_config, one_line_error

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

TEXT_FAST = [o for o in LM_FAST if not o.startswith("data.max_bytes")]  # pystdlib's own cap


def write_jsonl(folder: Path) -> dict[str, Path]:
    """Three splits of Python source as JSON lines, one document per stdlib function."""
    import inspect

    text = Path(json.__file__).read_text() + Path(inspect.__file__).read_text()[:40000]
    docs = [d for d in text.split("\ndef ") if d.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, part in (("train", docs[::3] * 3), ("validation", docs[1::3]), ("test", docs[2::3])):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return files


def test_a_bpe_trained_here_tokenises_local_jsonl_and_the_lm_reports_bpb_by_split(tmp_path):
    files = write_jsonl(tmp_path / "raw")
    out = tmp_path / "tokens"
    spec = ",".join(f"{k}={v}" for k, v in files.items())
    result = subprocess.run([sys.executable, "scripts/prepare_text.py", "--data-files", spec, "--train-tokenizer",
                             "--vocab-size", "384", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "hf" and meta["vocab_size"] == 384 and meta["dtype"] == "uint16"
    # Bytes per token of each split, counted here with the saved tokenizer (+1 byte and 1 id per end-of-text).
    tokenizer = make_tokenizer("hf", str(out / "tokenizer.json"))
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        docs = [json.loads(line)["text"] for line in files[name].read_text().splitlines()]
        tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(docs))
        assert meta["bytes_per_token"][split] == pytest.approx(sum(len(d.encode()) + 1 for d in docs) / tokens)
        assert np.fromfile(out / f"{split}.bin", dtype=np.uint16).size == tokens
    assert 1.5 < meta["bytes_per_token"]["train"] < 6.0  # a BPE merges bytes

    run_dir = tmp_path / "run"
    cfg = compose_config(run_dir, *TEXT_FAST, "data=hf_text", f"data.path={out}", "tokenizer=hf",
                         f"tokenizer.name={out / 'tokenizer.json'}", "data.eval_max_windows=4")
    assert cfg.data.vocab_size == cfg.model.vocab_size == 384
    run(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        expected = metrics[f"{split}/loss"] / (math.log(2) * meta["bytes_per_token"][split])
        assert metrics[f"{split}/bpb"] == pytest.approx(expected, rel=1e-5)


def test_hf_text_prepares_local_text_files_with_bytes_on_its_first_run(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    text = Path(json.__file__).read_text()
    for name, part in (("train", text * 2), ("validation", text[:6000]), ("test", text[6000:12000])):
        (raw / f"{name}.txt").write_text(part)
    files = "{" + ", ".join(f"{n}: {raw / n}.txt" for n in ("train", "validation", "test")) + "}"
    cfg = compose_config(tmp_path / "run", *TEXT_FAST, "data=hf_text", "data.dataset=null", "data.name=null",
                         f"data.path={tmp_path / 'tokens'}", f"data.data_files={files}", "tokenizer=bytes")
    assert cfg.model.vocab_size == 320
    run(cfg)
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "bytes", "name": None}
    # One document per line ("text" format); an end-of-text byte after each.
    lines = [line for line in (text * 2).splitlines() if line]
    assert meta["splits"]["train"]["documents"] == len(lines)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 3
    # Streaming reads the same documents in the same order: the same token files.
    streamed = tmp_path / "streamed"
    cfg = compose_config(tmp_path / "run2", *TEXT_FAST, "data=hf_text", "data.dataset=null", "data.name=null",
                         f"data.path={streamed}", f"data.data_files={files}", "tokenizer=bytes", "data.streaming=true")
    instantiate(cfg.data).prepare_data()
    for split in ("train", "val", "test"):
        assert (streamed / f"{split}.bin").read_bytes() == (tmp_path / "tokens" / f"{split}.bin").read_bytes()
    # The folder now holds bytes: reading it for another tokenizer is refused.
    other = HFTextDataModule(str(tmp_path / "tokens"), tokenizer={"kind": "hf", "name": "mine/tokenizer.json"},
                             vocab_size=320, seq_len=32, batch_size=4)
    with pytest.raises(ConfigError, match="holds tokens made by bytes:None, not hf:mine/tokenizer.json"):
        other.setup()


def test_an_interrupted_preparation_resumes_to_the_same_files(tmp_path):
    """Cut off while reading the 58th training document (7 batches of 8 written), the
    preparation resumes: the rerun encodes only the 44 training documents not yet written
    (counted here by wrapping the encoder), not all 100 again, and ends with the files of an
    uninterrupted run."""
    tokenizer = make_tokenizer("bytes")
    docs = [f"document {i}: " + "x" * (i % 17) for i in range(100)]

    class Interrupted(Exception):
        pass

    def breaking(items):
        for i, item in enumerate(items):
            if i == 57:
                raise Interrupted
            yield item

    encoded: list[str] = []

    def counting_encode(texts):
        encoded.extend(texts)
        return tokenizer.encode_batch(texts)

    whole = write_token_files({"train": docs, "val": docs[:10], "test": docs[:5]}, tokenizer.encode_batch,
                              tmp_path / "whole", 320, tokenizer.end_of_text, chunk_docs=8)
    with pytest.raises(Interrupted):
        write_token_files({"train": breaking(docs), "val": docs[:10], "test": docs[:5]}, counting_encode,
                          tmp_path / "cut", 320, tokenizer.end_of_text, chunk_docs=8)
    assert encoded == docs[:56]  # 7 whole batches; the 57th document was read but not yet written
    assert (tmp_path / "cut" / "train.bin.tmp").exists() and not (tmp_path / "cut" / "train.bin").exists()
    encoded.clear()
    resumed = write_token_files({"train": docs, "val": docs[:10], "test": docs[:5]}, counting_encode,
                                tmp_path / "cut", 320, tokenizer.end_of_text, chunk_docs=8)
    assert encoded == docs[56:] + docs[:10] + docs[:5]  # the rest of train, then val and test whole
    assert resumed == whole
    for split in ("train", "val", "test"):
        assert (tmp_path / "cut" / f"{split}.bin").read_bytes() == (tmp_path / "whole" / f"{split}.bin").read_bytes()
    assert not list((tmp_path / "cut").glob("*.progress.json"))


def test_text_mistakes_are_one_line(tmp_path):
    line = one_line_error(compose_config(tmp_path / "a", *TEXT_FAST, "data=hf_text", "data.dataset=null",
                                         f"data.path={tmp_path / 'tokens'}", "data.data_files={train: /no/such.jsonl}",
                                         "tokenizer=bytes"))
    assert "data.data_files: /no/such.jsonl does not exist" in line
    with pytest.raises(Exception, match="tokenizer.kind='nope' is unknown"):
        make_tokenizer("nope")
