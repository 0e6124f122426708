"""Token files, the format every text datamodule reads: `<split>.bin` arrays of token ids (uint16
or uint32) and a `meta.json`, written in chunks from text that Hugging Face `datasets` loads
(Hub datasets, or local text/jsonl/parquet/csv files). An interrupted preparation resumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from moelab.moe.errors import ConfigError

SPLITS = ("train", "val", "test")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def write_token_files(
    texts_by_split: Mapping[str, Iterable[str]],
    encode: Callable[[list[str]], list[list[int]]],
    out_dir: str | Path,
    vocab_size: int,
    end_of_text: int | None = None,
    encoding: str | None = None,
    chunk_docs: int = 1024,
    progress: Callable[[Iterable, str], Iterable] | None = None,
    tokenizer: Mapping | None = None,
) -> dict:
    """Tokenise each split's documents (in batches of `chunk_docs`) into `<out_dir>/<split>.bin`,
    `end_of_text` after every document, and write `meta.json` with each split's measured
    bytes per token (bits per byte divide by the ratio of the split evaluated).

    Interrupted, it resumes: a split is written as `<split>.bin.tmp` with a
    `<split>.progress.json` (documents, bytes and tokens done, file length) updated after
    every batch; a rerun cuts the .tmp back to the recorded length, skips the documents
    done and goes on. A split appears as `<split>.bin` only when complete. The documents
    must come in the same order on the rerun (a dataset's own order does)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = "uint16" if vocab_size <= 2**16 else "uint32"
    dtype = TOKEN_DTYPES[dtype_name]
    counts: dict[str, dict[str, int]] = {}
    for split, texts in texts_by_split.items():
        done_file = out / f"{split}.progress.json"
        final, tmp = out / f"{split}.bin", out / f"{split}.bin.tmp"
        if final.exists() and done_file.exists():  # finished by an earlier, interrupted run
            counts[split] = json.loads(done_file.read_text())["tally"]
            continue
        tally = {"bytes": 0, "tokens": 0, "documents": 0}
        if tmp.exists() and done_file.exists():
            state = json.loads(done_file.read_text())
            tally = state["tally"]
            with tmp.open("r+b") as f:
                f.truncate(state["file_bytes"])
        else:
            tmp.write_bytes(b"")
        skip = tally["documents"]
        with tmp.open("ab") as f:
            batch: list[str] = []
            docs = progress(texts, split) if progress else texts

            def flush() -> None:
                _write_batch(f, batch, encode, end_of_text, dtype, tally)
                f.flush()
                done_file.write_text(json.dumps({"tally": tally, "file_bytes": f.tell()}))
                batch.clear()

            for index, text in enumerate(docs):
                if index < skip:
                    continue
                batch.append(text)
                if len(batch) == chunk_docs:
                    flush()
            if batch:
                flush()
        tmp.replace(final)
        done_file.write_text(json.dumps({"tally": tally, "file_bytes": final.stat().st_size}))
        counts[split] = tally
    meta = {
        "vocab_size": vocab_size,
        "dtype": dtype_name,
        "bytes_per_token": {split: c["bytes"] / max(1, c["tokens"]) for split, c in counts.items()},
        "splits": counts,
        "encoding": encoding,
        "tokenizer": dict(tokenizer) if tokenizer else None,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for split in texts_by_split:
        (out / f"{split}.progress.json").unlink(missing_ok=True)
    return meta


def _write_batch(f, batch, encode, end_of_text, dtype, tally: dict[str, int]) -> None:
    """Append a batch of documents' ids; count their UTF-8 bytes, with one byte for each
    end-of-text (the document boundary, which a byte-level model of the same text would
    spell as a separator byte), so bits per byte compare across tokenizers."""
    for text, ids in zip(batch, encode(batch)):
        if end_of_text is not None:
            ids = [*ids, end_of_text]
        np.asarray(ids, dtype=dtype).tofile(f)
        tally["bytes"] += len(text.encode("utf-8")) + (end_of_text is not None)
        tally["tokens"] += len(ids)
        tally["documents"] += 1


LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def require_datasets() -> None:
    if importlib.util.find_spec("datasets") is None:
        raise ConfigError("data=hf_text needs the datasets package (the `hf` extra): run `pip install -e \".[hf]\"`")


def load_text_splits(
    dataset: str,
    name: str | None = None,
    data_files: Mapping[str, str | list[str]] | None = None,
    text_field: str = "text",
    splits: Mapping[str, str] | None = None,
    max_docs: int | None = None,
    streaming: bool = False,
) -> dict[str, Iterable[str]]:
    """Each of train/val/test as an iterable of document texts, through
    `datasets.load_dataset`: a Hub dataset by name, or local files with `data_files` (a
    split name → file(s) map) and `dataset` their format (text, json, parquet, csv), or
    null to read the format from the files' suffix. `streaming` reads without a local copy
    of the whole corpus."""
    require_datasets()
    import datasets

    splits = dict(splits or {"train": "train", "val": "validation", "test": "test"})
    if data_files is not None:
        data_files = {k: v for k, v in dict(data_files).items()}
        for files in data_files.values():
            for file in [files] if isinstance(files, str) else files:
                if "://" not in file and not Path(file).expanduser().exists():
                    raise ConfigError(f"data.data_files: {file} does not exist (relative paths start from {Path.cwd()})")
        if not dataset:
            first = next(iter(data_files.values()))
            first = first if isinstance(first, str) else first[0]
            dataset = LOCAL_FORMATS.get(Path(first).suffix)
            if dataset is None:
                raise ConfigError(f"data.data_files: cannot tell the format of {first}: set data.dataset=text, json, "
                                  "parquet or csv")
    try:
        loaded = datasets.load_dataset(dataset, name, data_files=data_files, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - the hub, the network and file parsers raise many types
        raise ConfigError(f"data.dataset={dataset} could not be loaded ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    texts: dict[str, Iterable[str]] = {}
    for split, source in splits.items():
        if source not in loaded:
            raise ConfigError(f"{dataset} has no split '{source}' (it has {', '.join(loaded)}): set data.splits.{split}")
        rows = loaded[source]
        if max_docs is not None:
            rows = rows.take(max_docs) if streaming else rows.select(range(min(max_docs, len(rows))))
        columns = getattr(rows, "column_names", None)
        if columns is not None and text_field not in columns:
            raise ConfigError(f"{dataset}'s {source} split has no field '{text_field}' (it has {', '.join(columns)}): "
                              "set data.text_field")
        texts[split] = (row[text_field] for row in rows if row[text_field])
    return texts


def prepare_text_tokens(out_dir: str | Path, tokenizer, progress: bool = True, **source) -> dict:
    """Tokenise a text dataset (`load_text_splits(**source)`) with `tokenizer`
    (moelab.data.tokenization) into token files and meta.json under `out_dir`."""
    texts = load_text_splits(**source)

    def bar(items, split):
        if not progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"tokenising {split}", unit=" docs")

    return write_token_files(texts, tokenizer.encode_batch, out_dir, vocab_size=tokenizer.vocab_size,
                             end_of_text=tokenizer.end_of_text, encoding=tokenizer.name if tokenizer.kind == "tiktoken" else None,
                             progress=bar, tokenizer=tokenizer.spec)
