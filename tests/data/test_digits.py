"""The bundled digits split: sizes, disjointness, determinism."""

import torch

from moelab.data.digits import DigitsDataModule


def test_split_is_fixed_disjoint_and_complete():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    sizes = {name: len(ds) for name, ds in a.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 270
    for name in a.splits:
        assert torch.equal(a.splits[name].tensors[0], b.splits[name].tensors[0])
    # Every image is in exactly one split.
    assert torch.equal(torch.cat(list(a.indices.values())).sort().values, torch.arange(1797))
    images, labels = next(iter(a.train_dataloader()))
    assert images.shape == (64, 1, 8, 8) and labels.dtype == torch.long
    assert abs(a.splits["train"].tensors[0].mean().item()) < 1e-5


def test_another_split_seed_gives_another_split():
    a, b = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    a.setup(), b.setup()
    assert not torch.equal(a.splits["val"].tensors[1], b.splits["val"].tensors[1])
