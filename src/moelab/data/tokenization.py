"""Tokenizers for text data, one interface: `tokenizer=bytes|tiktoken|hf`.

- `bytes`: UTF-8 bytes, ids 0..255, end-of-text 256 (no dependency);
- `tiktoken`: an OpenAI encoding by name (`gpt2`, `cl100k_base`, ...), needs tiktoken;
- `hf`: a `tokenizers` tokenizer: a local `tokenizer.json` (or a folder holding one, as
  `save_pretrained` and `scripts/prepare_text.py --train-tokenizer` write), or a Hub name
  (internet or the Hugging Face cache). Needs the `tokenizers` package.

`train_bpe` trains a byte-level BPE on texts with `tokenizers`, offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Iterator

from moelab.moe.errors import ConfigError

END_OF_TEXT = "<|endoftext|>"
KINDS = ("bytes", "tiktoken", "hf")
# Ids (n_vocab, special tokens included) of tiktoken's encodings, for sizing a model
# without loading them.
TIKTOKEN_IDS = {"gpt2": 50257, "r50k_base": 50257, "p50k_base": 50281, "cl100k_base": 100277, "o200k_base": 200019}


class Tokenizer:
    """`encode_batch(texts) -> ids per text`, `decode(ids)`, `vocab_size`, `end_of_text`
    (the id appended after every document, or None), and `spec`, the dict that rebuilds it
    (recorded in meta.json so a token folder says what made it)."""

    def __init__(self, kind: str, name: str | None, vocab_size: int, end_of_text: int | None, encode_batch, decode) -> None:
        self.kind, self.name, self.vocab_size, self.end_of_text = kind, name, vocab_size, end_of_text
        self.encode_batch, self.decode = encode_batch, decode

    @property
    def spec(self) -> dict:
        return {"kind": self.kind, "name": self.name}


def _require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{what} needs the {package} package: run `pip install -e \".[hf]\"`")


def make_tokenizer(kind: str = "tiktoken", name: str | None = None) -> Tokenizer:
    """The tokenizer `kind` (`bytes`, `tiktoken`, `hf`) named `name`; one-line errors."""
    if kind == "bytes":
        return Tokenizer("bytes", None, 257, 256, lambda texts: [list(t.encode("utf-8")) for t in texts],
                         lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"))
    if kind == "tiktoken":
        _require("tiktoken", "tokenizer=tiktoken")
        import tiktoken

        try:
            encoding = tiktoken.get_encoding(name or "gpt2")
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"tokenizer.name={name} is not a tiktoken encoding (e.g. gpt2, cl100k_base)") from exc
        except Exception as exc:  # noqa: BLE001 - tiktoken fetches the BPE files on first use
            raise ConfigError(f"tokenizer.name={name}: tiktoken could not load its files ({type(exc).__name__}); "
                              "without internet, use tokenizer=hf with a local tokenizer.json") from exc
        return Tokenizer("tiktoken", encoding.name, encoding.n_vocab, encoding.eot_token,
                         encoding.encode_ordinary_batch, encoding.decode)
    if kind == "hf":
        return _hf_tokenizer(name)
    raise ConfigError(f"tokenizer.kind={kind!r} is unknown: pick {', '.join(KINDS)}")


def _hf_tokenizer(name: str | None) -> Tokenizer:
    _require("tokenizers", "tokenizer=hf")
    from tokenizers import Tokenizer as HFTokenizer

    if not name:
        raise ConfigError("tokenizer=hf needs tokenizer.name: a tokenizer.json, a folder holding one, or a Hub name")
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        if path.suffix == ".json" or path.exists():
            if not path.is_file():
                raise ConfigError(f"tokenizer.name={name}: no tokenizer file at {path}")
            tokenizer = HFTokenizer.from_file(str(path))
        else:
            tokenizer = HFTokenizer.from_pretrained(name)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub and parse errors come in many types
        raise ConfigError(f"tokenizer.name={name} could not be loaded ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): give a local tokenizer.json, or "
                          "a Hub name with internet") from exc
    end = tokenizer.token_to_id(END_OF_TEXT)
    if end is None:  # a model's own end-of-sequence token, where it has one of the usual names
        end = next((tokenizer.token_to_id(t) for t in ("</s>", "<eos>", "[SEP]") if tokenizer.token_to_id(t) is not None), None)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer("hf", str(name), tokenizer.get_vocab_size(), end, encode_batch,
                     lambda ids: tokenizer.decode(list(ids)))


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path, progress: bool = True) -> Path:
    """Train a byte-level BPE (GPT-2's scheme: bytes as the base alphabet, so no text is
    out of vocabulary) on `texts` with `tokenizers`, plus the end-of-text token, and save
    it as `out/tokenizer.json`. Offline."""
    _require("tokenizers", "--train-tokenizer")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ConfigError(f"--vocab-size={vocab_size}: a byte-level BPE needs more than 257 ids (256 bytes + end-of-text)")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
