"""scikit-learn's bundled handwritten digits (1,797 8×8 images) as a LightningDataModule."""

from __future__ import annotations

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(L.LightningDataModule):
    """Digits split into train / val / test by a fixed seeded permutation.

    Pixels (0..16) are scaled to [0, 1] and standardised with the training split's mean
    and std. Images are (1, 8, 8) float tensors, labels 0..9.
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
    ) -> None:
        super().__init__()
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("data.val_fraction and data.test_fraction must be > 0 and sum to < 1")
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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
