"""Real image datasets: CIFAR-10/100 and any ImageFolder (the ImageNet layout), read by
torchvision, augmented with timm's training transforms and Mixup/CutMix.

Every random draw of the augmentation is seeded per sample from (seed, epoch, index), and
Mixup/CutMix per batch from its first sample's: the images a step sees depend on nothing
else (not the global RNG, not the worker count), so a run resumed mid-epoch trains on
exactly the images the uninterrupted run would have.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from moelab.data.sampling import (
    ResumableDataModule,
    ShuffleSampler,
    check_loader_args,
    epoch_seed,
    evaluation_loader,
    world_of,
)
from moelab.moe.errors import ConfigError

CIFAR = {
    # name: (torchvision class, folder it unpacks to, classes, mean, std, download size)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "163 MB"),
    "cifar100": ("CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "161 MB"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (epoch_seed(seed, epoch) * 1_000_003 + index) % (2**32)


class _Seeded:
    """Run a function with Python's, NumPy's and torch's global generators seeded, then
    put them back (timm's transforms draw from all three)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


class EpochShuffleSampler(ShuffleSampler):
    """ShuffleSampler yielding (index, epoch): the dataset seeds each sample's augmentation."""

    def __iter__(self):
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())


class AugmentedImages(Dataset):
    """`base[i]` (a PIL image and its label) through `transform`, the draws seeded by
    (seed, epoch, i). Items are addressed by (index, epoch); returns (image, label, seed)."""

    def __init__(self, base: Dataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, epoch = item
        image, label = self.base[index]
        sample_seed = _sample_seed(self.seed, epoch, index)
        with _Seeded(sample_seed):
            return self.transform(image), label, sample_seed


class MixupCollate:
    """Stack a batch, then (with mixup or cutmix on) mix it with timm's `Mixup`, its draw
    seeded by the batch's first sample: labels become soft targets (B, classes)."""

    def __init__(self, mixup: Any | None) -> None:
        self.mixup = mixup

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, seeds = default_collate(list(samples))
        if self.mixup is None:
            return images, labels
        with _Seeded(int(seeds[0])):
            return self.mixup(images, labels)


class _Transformed(Dataset):
    """`base[i]` with `transform` applied to the image (evaluation: no randomness)."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


class ImageDataModule(ResumableDataModule):
    """Shared machinery: subclasses give `load_splits()` → raw (PIL, label) datasets for
    train/val/test, and `num_classes`, `image_size`, `in_chans`, `mean`, `std`.

    Training images go through `timm.data.create_transform(is_training=True)`: random
    resized crop (`crop_scale`), flips, `auto_augment` (e.g. RandAugment
    "rand-m9-mstd0.5-inc1"; null: none), colour jitter and random erasing (`re_prob`),
    normalised with the dataset's mean/std. Evaluation images are resized and centre-cropped
    (`crop_pct`). With `mixup`/`cutmix` > 0, timm's Mixup mixes each training batch and
    smooths its labels (`label_smoothing`); the vision task then trains on the soft targets.
    """

    num_classes: int  # set by the subclass before ImageDataModule.__init__
    in_chans: int = 3
    class_names: list[str] | None = None  # for the specialisation views
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __init__(
        self,
        image_size: int,
        num_classes: int | None = None,
        in_chans: int = 3,
        batch_size: int = 128,
        num_workers: int = 4,
        seed: int = 0,
        eval_batch_size: int | None = None,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"data.image_size={image_size!r} must be an integer >= 8")
        self.image_size = image_size
        # The config states these for the model (model.num_classes: ${data.num_classes}); they must be the data's.
        if num_classes is not None and num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={num_classes}, but the data have {self.num_classes} classes: leave "
                              "data.num_classes as its config sets it")
        if in_chans != self.in_chans:
            raise ConfigError(f"data.in_chans={in_chans}, but the images have {self.in_chans} channels (RGB)")
        if eval_batch_size is not None:
            check_loader_args(eval_batch_size, num_workers, "data.eval_batch_size")
        if min(mixup, cutmix) < 0 or not 0 <= label_smoothing < 1 or not 0 <= re_prob <= 1:
            raise ConfigError(f"data.mixup={mixup} and data.cutmix={cutmix} must be >= 0, data.label_smoothing="
                              f"{label_smoothing} in [0, 1) and data.re_prob={re_prob} in [0, 1]")
        if (mixup or cutmix) and batch_size % 2:
            raise ConfigError(f"data.batch_size={batch_size} must be even with mixup/cutmix (pairs are mixed)")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.crop_scale, self.hflip, self.color_jitter = tuple(crop_scale), hflip, color_jitter
        self.auto_augment, self.re_prob, self.crop_pct, self.interpolation = auto_augment, re_prob, crop_pct, interpolation
        self.mixup_alpha, self.cutmix_alpha, self.mixup_prob, self.label_smoothing = mixup, cutmix, mixup_prob, label_smoothing
        self.splits: dict[str, Dataset] = {}

    # Subclasses: raw splits of (PIL image, label).
    def load_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def train_transform(self) -> Callable:
        from timm.data import create_transform

        return create_transform(
            self.image_size, is_training=True, scale=self.crop_scale, hflip=self.hflip,
            color_jitter=self.color_jitter, auto_augment=self.auto_augment, interpolation=self.interpolation,
            mean=self.mean, std=self.std, re_prob=self.re_prob,
        )

    def eval_transform(self) -> Callable:
        from timm.data import create_transform

        return create_transform(self.image_size, is_training=False, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, crop_pct=self.crop_pct)

    def mixup(self) -> Any | None:
        if not (self.mixup_alpha or self.cutmix_alpha):
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.mixup_prob,
                     label_smoothing=self.label_smoothing, num_classes=self.num_classes)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load_splits()
        evaluate = self.eval_transform()
        self.splits = {
            "train": AugmentedImages(raw["train"], self.train_transform(), self.seed),
            "val": _Transformed(raw["val"], evaluate),
            "test": _Transformed(raw["test"], evaluate),
        }

    def train_dataloader(self) -> DataLoader:
        world_size, rank = world_of(self.trainer)
        sampler = EpochShuffleSampler(len(self.splits["train"]), self.seed, world_size, rank)
        return self.training_loader(self.splits["train"], sampler, self.batch_size, self.num_workers, drop_last=True,
                                    collate_fn=MixupCollate(self.mixup()))

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.splits["val"], self.eval_batch_size, self.num_workers, self.seed, self.trainer)

    def test_dataloader(self) -> DataLoader:
        return evaluation_loader(self.splits["test"], self.eval_batch_size, self.num_workers, self.seed, self.trainer)


def held_out(num_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of range(num_items) into (train, val) with round(fraction·n) in val."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(num_items * fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 (`name`) from torchvision's python-batch files under `root`.
    Train minus a seeded `val_fraction` is the training split, that fraction is val, and
    the official test set is test. `download=true` fetches the archive (internet needed)."""

    def __init__(self, root: str, name: str = "cifar10", download: bool = False, val_fraction: float = 0.1,
                 split_seed: int = 0, image_size: int = 32, **kwargs: Any) -> None:
        if name not in CIFAR:
            raise ConfigError(f"data.name={name!r} is not a CIFAR: pick {' or '.join(CIFAR)}")
        self.name = name
        _, _, self.num_classes, self.mean, self.std, _ = CIFAR[name]
        super().__init__(image_size, **kwargs)
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        self.root, self.download, self.val_fraction, self.split_seed = Path(root).expanduser(), download, val_fraction, split_seed

    def prepare_data(self) -> None:
        if self.download:
            self._open(train=True, download=True)

    def _open(self, train: bool, download: bool = False) -> Dataset:
        import torchvision.datasets

        cls_name, folder, _, _, _, size = CIFAR[self.name]
        cls = getattr(torchvision.datasets, cls_name)
        if not download:
            cls = _as_present(cls, self.root / folder)
        try:
            return cls(str(self.root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise ConfigError(
                f"data={self.name}: no readable {cls_name} at {self.root / folder} (the python version's batches): set "
                f"data.root to the folder that holds {folder}/, or add data.download=true to fetch it ({size})"
            ) from exc
        except OSError as exc:  # a download without internet
            raise ConfigError(f"data={self.name}: downloading into {self.root} failed ({exc}): fetch it where there is "
                              f"internet and copy {folder}/ into data.root") from exc

    def load_splits(self) -> dict[str, Dataset]:
        train_all = self._open(train=True)
        self.class_names = list(getattr(train_all, "classes", []) or []) or None
        train, val = held_out(len(train_all), self.val_fraction, self.split_seed)
        return {"train": Subset(train_all, train), "val": Subset(train_all, val), "test": self._open(train=False)}


def _as_present(cls: type, folder: Path) -> type:
    """`cls` (torchvision's CIFAR10/100) expecting the md5 sums of the files present in
    `folder`, so it reads any file in CIFAR's format: torchvision compares each file with the
    published archive's sums, which rejects all but the original files (the tests write small
    ones). A download (`data.download=true`) still checks the archive."""
    import hashlib

    def present(name: str, md5: str) -> str:
        file = folder / name
        return hashlib.md5(file.read_bytes()).hexdigest() if file.is_file() else md5

    return type(cls.__name__, (cls,), {
        "train_list": [[name, present(name, md5)] for name, md5 in cls.train_list],
        "test_list": [[name, present(name, md5)] for name, md5 in cls.test_list],
        "meta": {**cls.meta, "md5": present(cls.meta["filename"], cls.meta["md5"])},
    })


def image_classes(root: str) -> list[str]:
    """The class names of an ImageFolder root: the sub-folders of `root/train`, sorted."""
    train = Path(root).expanduser() / "train"
    if not train.is_dir():
        raise ConfigError(f"data.root={root} has no train/ folder: an ImageFolder root holds train/<class>/<image> and "
                          "val/<class>/<image> (the ImageNet layout)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ConfigError(f"{train} holds {len(classes)} class folder(s): an ImageFolder needs one folder per class")
    return classes


class ImageFolderDataModule(ImageDataModule):
    """An ImageFolder root with `train/` and `val/` (and optionally `test/`; else val is
    also the test split), one sub-folder per class, read by torchvision's ImageFolder.
    Images are converted to RGB (`in_chans` 3) and resized to `image_size`. An image that
    cannot be read (truncated, not an image) stops the run with one line naming its file;
    with `skip_bad_images=true` it is replaced by the next readable image of its split and
    named in a warning, with the count so far."""

    def __init__(self, root: str, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, skip_bad_images: bool = False, **kwargs: Any) -> None:
        self.root = Path(root).expanduser()
        self.classes = image_classes(str(self.root))
        self.num_classes, self.mean, self.std = len(self.classes), tuple(mean), tuple(std)
        self.class_names = self.classes
        self.skip_bad_images = bool(skip_bad_images)
        super().__init__(image_size, **kwargs)

    def _folder(self, split: str) -> Dataset:
        from torchvision.datasets import ImageFolder

        folder = self.root / split
        if not folder.is_dir():
            raise ConfigError(f"data.root={self.root} has no {split}/ folder: an ImageFolder root holds train/ and val/, "
                              "each with one sub-folder per class")
        try:
            dataset = ImageFolder(str(folder), loader=_rgb)
        except FileNotFoundError as exc:
            raise ConfigError(f"{folder}: {exc}".splitlines()[0]) from exc
        if dataset.classes != self.classes:
            missing = sorted(set(self.classes) - set(dataset.classes)) or sorted(set(dataset.classes) - set(self.classes))
            raise ConfigError(f"{folder} has other classes than {self.root / 'train'} (e.g. {missing[0]!r}): every split "
                              "needs the same class folders")
        return SkipUnreadable(dataset) if self.skip_bad_images else dataset

    def load_splits(self) -> dict[str, Dataset]:
        val = self._folder("val")
        test = self._folder("test") if (self.root / "test").is_dir() else val
        return {"train": self._folder("train"), "val": val, "test": test}


class UnreadableImage(ConfigError):
    """An image file that cannot be decoded, by its path. (Also built from one message: a
    DataLoader worker's exception is re-raised in the main process as `type(message)`.)"""

    def __init__(self, path: str, exc: BaseException | None = None) -> None:
        if exc is None:
            super().__init__(path)
            self.path = None
            return
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        super().__init__(f"{path} is not a readable image ({type(exc).__name__}: {why}): remove or replace it, or set "
                         "data.skip_bad_images=true to skip such files")
        self.path = path


def _rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:  # PIL's errors for bad files
        raise UnreadableImage(path, exc) from None


class SkipUnreadable(Dataset):
    """`base[i]`, or, where its image cannot be read, the next readable item (so batches keep
    their size); each skipped file is named once in a warning with this process's count."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # classes, targets, samples: the base's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int):
        for offset in range(len(self.base)):
            try:
                return self.base[(index + offset) % len(self.base)]
            except UnreadableImage as bad:
                if bad.path not in self.skipped:
                    self.skipped.add(bad.path)
                    warnings.warn(f"moelab: skipped {bad.path}, not a readable image ({len(self.skipped)} skipped so far "
                                  "in this loader process)", stacklevel=2)
        raise ConfigError(f"no image of {len(self.base)} in this split is readable")
