"""Tokenise a text dataset (the Hugging Face Hub, or local text/jsonl/parquet/csv files)
into `data=tokens` / `data=hf_text` token files, with a progress bar; resumes if interrupted.

    pip install -e ".[hf]"
    python scripts/prepare_text.py --out data/tokens                       # wikitext-103, GPT-2 BPE
    python scripts/prepare_text.py --dataset roneneldan/TinyStories --name none \
        --splits train=train,val=validation,test=validation --out data/tinystories
    python scripts/prepare_text.py --data-files train=a.jsonl,validation=b.jsonl,test=c.jsonl \
        --train-tokenizer --vocab-size 8192 --out data/mine           # local files, a BPE trained here, offline
    python train.py experiment=lm_small_gpu data=tokens data.path=data/tokens

Writes <out>/{train,val,test}.bin (uint16 ids, uint32 above 65,536 ids) and meta.json
(vocab_size, dtype, bytes_per_token per split, the tokenizer). With --train-tokenizer, a
byte-level BPE of --vocab-size ids is first trained on the training split and saved as
<out>/tokenizer.json (train with `data=hf_text data.path=<out> tokenizer=hf
tokenizer.name=<out>/tokenizer.json`, or `data=tokens data.path=<out>`).

Sizes: token files take 2 bytes per token (4 above 65,536 ids): 2 GB for 1B GPT-2 tokens.
Tokenising holds one batch of 1,024 documents in memory; a Hub dataset is also cached by
`datasets` as Arrow files, about the raw text's size (≈ 4.5 GB for 1B GPT-2 tokens of
English) unless --streaming reads it without a copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.data.token_files import load_text_splits, prepare_text_tokens  # noqa: E402
from moelab.data.tokenization import KINDS, make_tokenizer, train_bpe  # noqa: E402
from moelab.moe.errors import ConfigError  # noqa: E402


def parse_map(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split(",") if item)


def parse_splits(value: str) -> dict[str, str]:
    pairs = parse_map(value)
    if set(pairs) != {"train", "val", "test"}:
        raise argparse.ArgumentTypeError("--splits needs train=..,val=..,test=.. (the dataset's split names)")
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for train.bin, val.bin, test.bin, meta.json")
    parser.add_argument("--dataset", default=None, help="a Hub dataset, or a format (text, json, parquet, csv) for "
                        "--data-files (default: wikitext-103 without --data-files, the files' suffix with them)")
    parser.add_argument("--name", default=None, help="the dataset's config name ('none' for none)")
    parser.add_argument("--data-files", type=parse_map, default=None, help="local files: split=file,split=file,...")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--splits", type=parse_splits, default=parse_splits("train=train,val=validation,test=test"))
    parser.add_argument("--tokenizer", default="tiktoken", choices=KINDS)
    parser.add_argument("--tokenizer-name", default=None, help="tiktoken encoding (gpt2), or an hf tokenizer.json / Hub name")
    parser.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the training split first")
    parser.add_argument("--vocab-size", type=int, default=8192, help="ids of the trained BPE (with --train-tokenizer)")
    parser.add_argument("--max-docs", type=int, default=None, help="documents per split (for a quick try)")
    parser.add_argument("--streaming", action="store_true", help="read the dataset without a local copy")
    args = parser.parse_args(argv)
    dataset = args.dataset if args.dataset or args.data_files else "Salesforce/wikitext"
    name = args.name if args.name is not None else (None if args.data_files or args.dataset else "wikitext-103-raw-v1")
    source = dict(dataset=dataset, name=None if name == "none" else name, data_files=args.data_files,
                  text_field=args.text_field, splits=args.splits, max_docs=args.max_docs, streaming=args.streaming)
    try:
        if args.train_tokenizer:
            train_texts = load_text_splits(**source)["train"]
            path = train_bpe(train_texts, args.vocab_size, args.out)
            print(f"trained a byte-level BPE of {args.vocab_size} ids: {path}")
            tokenizer = make_tokenizer("hf", str(path))
        else:
            tokenizer = make_tokenizer(args.tokenizer, args.tokenizer_name)
        meta = prepare_text_tokens(args.out, tokenizer, **source)
    except ConfigError as error:
        sys.exit(f"prepare_text: error: {error}")
    print(f"wrote {args.out}: {meta}")


if __name__ == "__main__":
    main()
