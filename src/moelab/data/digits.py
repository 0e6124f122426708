"""scikit-learn's bundled handwritten digits (1,797 8×8 images) as a LightningDataModule."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from moelab.data.sampling import ResumableDataModule, ShuffleSampler, check_loader_args, evaluation_loader, world_of
from moelab.moe.errors import ConfigError


class DigitsDataModule(ResumableDataModule):
    """Digits split into train / val / test by a fixed seeded permutation.

    Pixels (0..16) are scaled to [0, 1] and standardised with the training split's mean
    and std. Images are (1, 8, 8) float tensors, labels 0..9. Training batches are a fresh
    permutation per epoch, seeded by (seed, epoch); a resumed run continues mid-epoch.
    """

    num_classes = 10
    image_size = 8
    in_chans = 1

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ConfigError("data.val_fraction and data.test_fraction must be > 0 and sum to < 1")
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}
        self.indices: dict[str, torch.Tensor] = {}  # rows of load_digits() in each split

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        n_val = round(len(labels) * self.hparams.val_fraction)
        n_test = round(len(labels) * self.hparams.test_fraction)
        n_train = len(labels) - n_val - n_test
        self.indices = index = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        mean = images[index["train"]].mean()
        std = images[index["train"]].std()
        self.splits = {
            name: TensorDataset((images[idx] - mean) / std, labels[idx]) for name, idx in index.items()
        }

    def train_dataloader(self) -> DataLoader:
        world_size, rank = world_of(self.trainer)
        sampler = ShuffleSampler(len(self.splits["train"]), self.hparams.seed, world_size, rank)
        return self.training_loader(self.splits["train"], sampler, self.hparams.batch_size, self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def _evaluation_loader(self, split: str) -> DataLoader:
        hp = self.hparams
        return evaluation_loader(self.splits[split], hp.batch_size, hp.num_workers, hp.seed, self.trainer)
