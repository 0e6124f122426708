"""The bundled digits split: sizes, disjointness, determinism."""

import pytest
import torch

from moelab.data.digits import DigitsDataModule
from moelab.moe.errors import ConfigError


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



def test_erasing_blanks_one_square_per_image():
    module = DigitsDataModule(erase_size=3)
    out = module._corrupt(torch.ones(50, 1, 8, 8), 0)
    for image in out[:, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        assert len(rows) == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
        assert torch.all(image[image != 0] == 1)


def test_shifting_moves_each_image_by_at_most_max_shift():
    module = DigitsDataModule(max_shift=1)
    dot = torch.zeros(50, 1, 8, 8)
    dot[:, 0, 4, 4] = 1.0
    out = module._corrupt(dot, 0)
    assert torch.equal(out.sum((1, 2, 3)), torch.ones(50))  # moved, not lost (zeros fill in)
    where = [divmod(int(image.argmax()), 8) for image in out[:, 0]]
    assert all(abs(r - 4) <= 1 and abs(c - 4) <= 1 for r, c in where)
    assert len(set(where)) > 4  # the offsets vary


def test_noise_has_the_asked_std():
    out = DigitsDataModule(noise_std=0.3)._corrupt(torch.zeros(4000, 1, 8, 8), 0)
    assert abs(out.std().item() - 0.3) < 0.005 and abs(out.mean().item()) < 0.005


def test_copies_keep_every_label_and_corruption_is_fixed_by_split_seed():
    from sklearn.datasets import load_digits

    settings = dict(max_shift=1, erase_size=2, noise_std=0.3, copies=2)
    a, b, c = DigitsDataModule(**settings), DigitsDataModule(**settings), DigitsDataModule(split_seed=1, **settings)
    a.setup(), b.setup(), c.setup()
    target = torch.tensor(load_digits().target)
    for split, n in (("train", 1257), ("val", 270), ("test", 270)):
        images, labels = a.splits[split].tensors
        assert len(labels) == 2 * n
        assert torch.equal(labels, target[a.indices[split].repeat(2)])  # row i is digit i mod n
        assert not torch.equal(images[:n], images[n:])  # the copies are corrupted apart
        assert torch.equal(images, b.splits[split].tensors[0])
    assert not torch.equal(a.splits["test"].tensors[0], c.splits["test"].tensors[0])
    assert abs(a.splits["train"].tensors[0].mean().item()) < 1e-5  # standardised after corruption


def test_bad_corruption_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"data.copies=0 >= 1"):
        DigitsDataModule(copies=0)
    with pytest.raises(ConfigError, match=r"data.max_shift=8 must be in 0..7"):
        DigitsDataModule(max_shift=8)
