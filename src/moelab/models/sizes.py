"""The `${moelab.*:}` resolvers that size a model from its data before anything is built
(class count, patch size, vocabulary), registered on import: every config that builds a
model may use them, so moelab.models.build imports this. Light: no torch."""

from __future__ import annotations

from omegaconf import OmegaConf


def image_classes(root: str) -> int:
    """`${moelab.image_classes:${data.root}}`: the class folders of an ImageFolder root."""
    from moelab.data.images import image_classes as classes

    return len(classes(root))


def patch_size(image_size: int) -> int:
    """`${moelab.patch_size:${data.image_size}}`: 2 for the 8×8 digits (16 patches), 4 up to
    64 pixels (CIFAR's 32: 64 patches, the usual ViT-on-CIFAR setting), 16 above (224:
    196 patches, as timm's /16 models)."""
    return 2 if image_size <= 16 else 4 if image_size <= 64 else 16


def vocab_size(kind: str, name: str | None) -> int:
    """`${moelab.vocab_size:<kind>,<name>}`: the tokenizer's id count rounded up to a
    multiple of 64 (embedding rows that tile well on GPUs), read from the tokenizer."""
    from moelab.data.tokenization import TIKTOKEN_IDS, make_tokenizer

    known = TIKTOKEN_IDS.get(name) if kind == "tiktoken" else 257 if kind == "bytes" else None
    ids = known or make_tokenizer(kind, name).vocab_size  # the common encodings need no tiktoken to compose
    return -(-ids // 64) * 64


OmegaConf.register_new_resolver("moelab.image_classes", image_classes, replace=True)
OmegaConf.register_new_resolver("moelab.patch_size", patch_size, replace=True)
OmegaConf.register_new_resolver("moelab.vocab_size", vocab_size, replace=True)
