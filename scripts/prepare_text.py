"""Tokenise a Hugging Face text dataset with tiktoken into `data=tokens` files, with a progress bar.

    pip install -e ".[hf]"
    python scripts/prepare_text.py --out data/tokens                       # wikitext-103, GPT-2 BPE
    python scripts/prepare_text.py --dataset roneneldan/TinyStories --name none \
        --splits train=train,val=validation,test=validation --out data/tinystories
    python train.py experiment=lm_small_gpu data=tokens data.path=data/tokens

Writes <out>/{train,val,test}.bin (uint16 ids, uint32 above 65,536 ids) and meta.json
(vocab_size, dtype, bytes_per_token, encoding).
"""

from __future__ import annotations

import argparse
import sys

from moelab.data.text import prepare_hf_tokens
from moelab.moe.errors import ConfigError


def parse_splits(value: str) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in value.split(",") if item)
    if set(pairs) != {"train", "val", "test"}:
        raise argparse.ArgumentTypeError("--splits needs train=..,val=..,test=.. (HF split names)")
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.bin, val.bin, test.bin, meta.json")
    parser.add_argument("--dataset", default="Salesforce/wikitext")
    parser.add_argument("--name", default="wikitext-103-raw-v1", help="dataset config name ('none' for none)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--splits", type=parse_splits, default=parse_splits("train=train,val=validation,test=test"))
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding")
    parser.add_argument("--max-docs", type=int, default=None, help="documents per split (for a quick try)")
    args = parser.parse_args(argv)
    try:
        meta = prepare_hf_tokens(
            args.out, args.dataset, None if args.name == "none" else args.name, args.text_field,
            args.splits, args.encoding, args.max_docs,
        )
    except ConfigError as error:
        sys.exit(f"prepare_text: error: {error}")
    print(f"wrote {args.out}: {meta}")


if __name__ == "__main__":
    main()
