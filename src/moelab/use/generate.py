"""`python generate.py ckpt_path=<checkpoint> prompt="def "`: text from a trained language model,
streamed as it is sampled, then which experts of each MoE layer the generated tokens used."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import torch
from torch import nn

from moelab.data.tokenization import Tokenizer, make_tokenizer
from moelab.moe.errors import ConfigError


def tokenizer_of(config: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a language-model run trained with, from its config: bytes for the stdlib
    sources, the `tokenizer` spec of data=hf_text, or the one a token folder's meta.json names."""
    data = config.get("data") or {}
    target = str(data.get("_target_", ""))
    if target.endswith("PyStdlibDataModule"):
        return make_tokenizer("bytes")
    spec = data.get("tokenizer")
    if not spec and data.get("path"):
        meta = Path(str(data["path"])) / "meta.json"
        if meta.is_file():
            spec = json.loads(meta.read_text()).get("tokenizer")
    if not spec:
        raise ConfigError(f"the run's data ({target or 'unknown'}) does not say which tokenizer made its ids, so its "
                          "tokens cannot be turned back into text")
    return make_tokenizer(spec.get("kind", "tiktoken"), spec.get("name"))


class ExpertTally:
    """Per MoE layer, how much of the generated tokens each expert processed: after every
    step, the newest position's row of each layer's plan (`expert_share_TE`)."""

    def __init__(self, model: nn.Module) -> None:
        from moelab.callbacks.common import indexed_moe_layers  # FFN layers and attention mixtures (`1/attn`)

        self.layers = indexed_moe_layers(model)
        self.counts = {index: torch.zeros(layer.num_experts, dtype=torch.float64) for index, layer in self.layers}
        self.tokens = 0

    def add_newest(self) -> None:
        for index, layer in self.layers:
            if layer.last_plan is not None:
                self.counts[index] += layer.last_plan.expert_share_TE()[-1].double().cpu()
        self.tokens += 1

    def lines(self, top: int = 8) -> list[str]:
        """One line per layer: its most used experts and their share of the layer's choices."""
        out = []
        for index, counts in self.counts.items():
            share = counts / counts.sum().clamp_min(1e-12)
            order = torch.argsort(share, descending=True)[:top].tolist()
            used = ", ".join(f"e{e} {share[e]:.0%}" for e in order if share[e] > 0)
            unused = int((counts == 0).sum())
            out.append(f"  layer {index}: {used}" + (f"; {unused} of {len(counts)} experts unused" if unused else ""))
        return out


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0, max_context: int | None = None,
                  stream: TextIO | None = None, top_p: float | None = None) -> tuple[list[int], ExpertTally]:
    """Sample `max_new_tokens` after `prompt` (temperature 0: greedy). Streams the text to
    `stream` as it comes; returns the generated ids and the experts they used."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1, or null for the whole vocabulary")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1], or null for no nucleus cut")
    ids = tokenizer.encode_batch([prompt])[0]
    vocab = model.vocab_size
    if not ids:
        if tokenizer.end_of_text is None or tokenizer.end_of_text >= vocab:
            raise ConfigError("prompt is empty: give the text to continue, e.g. prompt='def '")
        ids = [tokenizer.end_of_text]
    if max(ids) >= vocab:
        raise ConfigError(f"the prompt has token id {max(ids)}, beyond the model's vocabulary of {vocab}")
    device = next(model.parameters()).device
    tally = ExpertTally(model)
    printer = _Streamer(tokenizer, stream)

    def on_token(next_ids) -> None:
        tally.add_newest()
        printer.add(int(next_ids[0]))

    generator = torch.Generator().manual_seed(seed)
    tokens = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                            top_k=top_k, generator=generator, max_context=max_context, on_token=on_token,
                            top_p=top_p)
    printer.flush()
    return tokens[0, len(ids):].tolist(), tally


class _Streamer:
    """Writes the decoded text as tokens arrive; a token that ends inside a multi-byte
    character waits for the rest of it."""

    def __init__(self, tokenizer: Tokenizer, stream: TextIO | None) -> None:
        self.tokenizer, self.stream, self.ids, self.shown = tokenizer, stream, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self.stream is not None:
            text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
            self._show(text)

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.stream.write(text[self.shown:])
            self.stream.flush()
            self.shown = len(text)

    def flush(self) -> None:
        if self.stream is not None:
            self._show(self.tokenizer.decode(self.ids))


def main_generate(cfg: Mapping[str, Any], prompt: str, stream: TextIO = sys.stdout,
                  report: Callable[[str], None] | None = None) -> list[int]:
    """What generate.py runs: load `ckpt_path`, stream the continuation of `prompt`, then
    report the experts the generated tokens used."""
    from moelab.tasks.checkpoint_io import model_from_state, read_model_state

    path = str(cfg["ckpt_path"])
    weights, config = read_model_state(path, "ckpt_path")
    model = model_from_state(weights, config, "ckpt_path", path)
    if not hasattr(model, "generate"):
        raise ConfigError(f"ckpt_path={path} holds a {type(model).__name__}, not a language model: "
                          "generate.py needs one (for images: predict.py)")
    device = _device(cfg.get("device", "auto"))
    model.to(device)
    tokenizer = tokenizer_of(config)
    stream.write(prompt)
    top_k = cfg.get("top_k")
    max_context = (config.get("data") or {}).get("seq_len")
    ids, tally = generate_text(model, tokenizer, prompt, int(cfg["max_new_tokens"]), float(cfg["temperature"]),
                               None if top_k is None else int(top_k), int(cfg.get("seed", 0)), max_context, stream,
                               None if cfg.get("top_p") is None else float(cfg["top_p"]))
    stream.write("\n")
    say = report or (lambda line: print(line, file=sys.stderr))
    if tally.layers:
        say(f"experts used by the {len(ids)} generated tokens (share of each MoE layer's choices):")
        for line in tally.lines():
            say(line)
    return ids


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}, but this machine has no GPU: use device=cpu")
    return torch.device(name)
