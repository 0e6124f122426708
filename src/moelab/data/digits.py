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

    Corruption (all off by default; `data=digits_hard` turns it on) makes the task harder
    so that methods the clean task ranks within seed noise can separate: each image is
    shifted by up to `max_shift` pixels each way (zeros fill in), a random `erase_size`²
    square is blanked, and Gaussian noise of std `noise_std` (in [0, 1] pixel units) is
    added. Each split holds `copies` corrupted versions of each of its digits (row i is
    digit `indices[split][i % n]`): more varied training data, and evaluation sets large
    enough that their sampling noise does not hide the methods' differences. Corruptions
    are drawn once from (split_seed, split): the data are fixed, so a resumed run sees the
    same images.
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
        max_shift: int = 0,
        erase_size: int = 0,
        noise_std: float = 0.0,
        copies: int = 1,
        image_size: int = 8,
        in_chans: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if (image_size, in_chans, num_classes) != (self.image_size, self.in_chans, self.num_classes):
            raise ConfigError(
                f"data.image_size={image_size}, data.in_chans={in_chans}, data.num_classes={num_classes}: the digits "
                f"are {self.image_size}x{self.image_size}, {self.in_chans} channel, {self.num_classes} classes; "
                "leave these as data=digits sets them"
            )
        if not (0 <= max_shift < 8 and 0 <= erase_size <= 8 and noise_std >= 0 and copies >= 1):
            raise ConfigError(
                f"data.max_shift={max_shift} must be in 0..7, data.erase_size={erase_size} in 0..8, "
                f"data.noise_std={noise_std} >= 0 and data.copies={copies} >= 1"
            )
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
        copies = self.hparams.copies
        split_images = {
            name: self._corrupt(images[idx].repeat(copies, 1, 1, 1), number)
            for number, (name, idx) in enumerate(index.items())
        }
        mean = split_images["train"].mean()
        std = split_images["train"].std()
        self.pixel_mean, self.pixel_std = float(mean), float(std)
        self.splits = {
            name: TensorDataset((split_images[name] - mean) / std, labels[idx].repeat(copies))
            for name, idx in index.items()
        }

    def eval_transform(self):
        """New images (PIL) as the splits hold theirs: grayscale, 8x8, ink bright, scaled to
        0..1 (load_digits() / 16) and standardised by the training split's mean and std."""
        from PIL import Image

        self.setup()
        mean, std = self.pixel_mean, self.pixel_std

        def transform(image: "Image.Image") -> torch.Tensor:
            small = image.convert("L").resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).float() / 255.0
            return ((pixels.view(1, self.image_size, self.image_size) - mean) / std)

        return transform

    def _corrupt(self, images_N1HW: torch.Tensor, split_number: int) -> torch.Tensor:
        """Shift, erase and add noise to one split's images (module docstring)."""
        hp = self.hparams
        if not (hp.max_shift or hp.erase_size or hp.noise_std):
            return images_N1HW
        generator = torch.Generator().manual_seed(hp.split_seed * 1_000_003 + split_number)
        num, _, height, width = images_N1HW.shape
        out = images_N1HW.clone()
        if hp.max_shift:
            s = hp.max_shift
            padded = torch.nn.functional.pad(images_N1HW, (s, s, s, s))
            offsets = torch.randint(0, 2 * s + 1, (num, 2), generator=generator)
            for i, (dy, dx) in enumerate(offsets.tolist()):
                out[i] = padded[i, :, dy : dy + height, dx : dx + width]
        if hp.erase_size:
            corners = torch.randint(0, height - hp.erase_size + 1, (num, 2), generator=generator)
            for i, (y, x) in enumerate(corners.tolist()):
                out[i, :, y : y + hp.erase_size, x : x + hp.erase_size] = 0.0
        if hp.noise_std:
            out = out + hp.noise_std * torch.randn(out.shape, generator=generator)
        return out

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
