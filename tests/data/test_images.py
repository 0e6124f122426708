"""Real image data on files the tests write in the real formats: CIFAR's python batches and
an ImageFolder of PNGs. Augmentation is seeded per sample, the model is sized from the data,
and a missing dataset is one line."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moelab.data.images import AugmentedImages, CIFARDataModule, ImageFolderDataModule, MixupCollate
from moelab.models.build import build_model
from moelab.models.placement import moe_layer_indices
from moelab.moe.errors import ConfigError
from moelab.run.train import run

from ..conftest import VIT_FAST, compose_config, one_line_error


def write_cifar(root: Path, classes: int = 10, per_batch: int = 8) -> Path:
    """CIFAR-10's (or -100's) python batches, as torchvision reads them, with random pixels."""
    rng = np.random.default_rng(0)
    hundred = classes == 100
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    for name in [*names, "test"] if hundred else [*names, "test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else {"label_names": [f"c{i}" for i in range(10)]}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta))
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


FAST_IMAGES = ["data.num_workers=0", "data.batch_size=8", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def test_cifar10_trains_with_the_default_model_and_mixup(tmp_path):
    root = write_cifar(tmp_path / "data")
    cfg = compose_config(tmp_path / "run", *VIT_FAST, "data=cifar10", f"data.root={root}", *FAST_IMAGES)
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.model.num_classes, cfg.model.patch_size) == (32, 3, 10, 4)
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["step"] == 3 and math.isfinite(metrics["train/ce"])
    # Mixup/CutMix reached the training batches: soft targets over the 10 classes that mix two
    # classes (label smoothing 0.1 alone would give only 0.91 and 0.01).
    _, labels = next(iter(_loader(cfg)))
    assert labels.shape == (8, 10) and torch.allclose(labels.sum(-1), torch.ones(8))
    smoothed_only = torch.isclose(labels, torch.tensor(0.91)) | torch.isclose(labels, torch.tensor(0.01))
    assert not bool(smoothed_only.all())


def test_cifar100_and_a_vit_preset_build_from_the_data(tmp_path):
    root = write_cifar(tmp_path / "data", classes=100, per_batch=40)
    cfg = compose_config(tmp_path / "run", *VIT_FAST, "data=cifar100", f"data.root={root}", "model=vit_tiny",
                         "model.depth=2", *FAST_IMAGES)
    assert (cfg.model.embed_dim, cfg.model.num_heads, cfg.model.num_classes, cfg.model.patch_size) == (192, 3, 100, 4)
    run(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 3
    datamodule = CIFARDataModule(str(root), name="cifar100", num_workers=0, batch_size=4)
    datamodule.setup()
    assert len(datamodule.splits["train"]) + len(datamodule.splits["val"]) == 40 and len(datamodule.splits["test"]) == 40


def test_image_folder_trains_with_its_class_count_from_the_folders(tmp_path):
    root = write_image_folder(tmp_path / "folder")
    cfg = compose_config(tmp_path / "run", *VIT_FAST, "data=imagefolder", f"data.root={root}", "data.image_size=32",
                         *FAST_IMAGES, "data.batch_size=4")
    assert cfg.model.num_classes == 3
    run(cfg)
    images, labels = next(iter(_loader(cfg)))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 3)  # mixed soft targets over 3 classes
    assert torch.allclose(labels.sum(-1), torch.ones(4))


def _loader(cfg):
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return datamodule.train_dataloader()


def test_augmentation_is_seeded_per_sample_not_by_the_global_rng(tmp_path):
    root = write_image_folder(tmp_path / "folder")
    datamodule = ImageFolderDataModule(str(root), image_size=32, num_workers=0, batch_size=4)
    datamodule.setup()
    train: AugmentedImages = datamodule.splits["train"]
    torch.manual_seed(1)
    first = train[(3, 0)][0]
    torch.manual_seed(2), np.random.seed(2)
    assert torch.equal(train[(3, 0)][0], first)  # the global generators do not matter
    assert not torch.equal(train[(3, 1)][0], first)  # another epoch, other draws
    state = torch.get_rng_state()
    train[(5, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # and are left as they were
    collate = MixupCollate(datamodule.mixup())
    batch = [train[(i, 0)] for i in range(4)]
    a, b = collate(batch), collate(batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_missing_data_is_one_line(tmp_path):
    line = one_line_error(compose_config(tmp_path / "a", *VIT_FAST, "data=cifar10", f"data.root={tmp_path / 'none'}"))
    assert f"no readable CIFAR10 at {tmp_path / 'none' / 'cifar-10-batches-py'}" in line and "data.download=true" in line
    line = one_line_error(compose_config(tmp_path / "b", *VIT_FAST, "data=imagefolder", f"data.root={tmp_path}"))
    assert f"data.root={tmp_path} has no train/ folder" in line
    folder = write_image_folder(tmp_path / "folder")
    (folder / "val" / "cat").rename(folder / "val" / "cow")
    line = one_line_error(compose_config(tmp_path / "c", *VIT_FAST, "data=imagefolder", f"data.root={folder}",
                                         "data.image_size=32", *FAST_IMAGES))
    assert "has other classes than" in line
    with pytest.raises(ConfigError, match="must be even with mixup"):
        ImageFolderDataModule(str(folder), batch_size=5)


def test_v_moe_last_n_placement():
    assert moe_layer_indices(12, 2) == [1, 3, 5, 7, 9, 11]
    assert moe_layer_indices(12, 2, moe_last=2) == [9, 11]
    assert moe_layer_indices(12, 1, moe_last=3) == [9, 10, 11]
    with pytest.raises(ConfigError, match="only 2 block"):
        moe_layer_indices(4, 2, moe_last=3)
    model = build_model(compose_config(Path("."), "model.moe_last=1"))
    assert model.moe_indices == [3]


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half, as an interrupted copy leaves one."""
    buffer = path.with_suffix(".full.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, quality=95)
    data = buffer.read_bytes()
    buffer.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named_in_one_line_from_any_loader_process(tmp_path, workers):
    folder = write_image_folder(tmp_path / "folder")
    bad = truncated_jpeg(folder / "val" / "dog" / "bad.jpg")  # validation reads every val image
    line = one_line_error(compose_config(tmp_path / "run", *VIT_FAST, "data=imagefolder", f"data.root={folder}",
                                         "data.image_size=32", *FAST_IMAGES, f"data.num_workers={workers}",
                                         "data.batch_size=4", "data.eval_batch_size=16"))
    assert f"{bad} is not a readable image (OSError" in line and "data.skip_bad_images=true" in line
    # The loaders' workers (which ignore SIGTERM) are gone with the run: left waiting, they
    # made the process hang at exit in multiprocessing's join.
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.daemon]


def test_skip_bad_images_replaces_them_and_names_each_once(tmp_path):
    folder = write_image_folder(tmp_path / "folder")
    bad = truncated_jpeg(folder / "train" / "cat" / "bad.jpg")
    datamodule = ImageFolderDataModule(str(folder), image_size=32, num_workers=0, batch_size=4, skip_bad_images=True)
    datamodule.setup()
    raw = datamodule.splits["train"].base
    index = next(i for i, (path, _) in enumerate(raw.samples) if path == str(bad))
    with pytest.warns(UserWarning, match=f"skipped {bad}, not a readable image \\(1 skipped so far"):
        image, label = raw[index]
    assert (image.size, label) == (raw[index + 1][0].size, raw[index + 1][1])  # the next readable one
    cfg = compose_config(tmp_path / "run", *VIT_FAST, "data=imagefolder", f"data.root={folder}", "data.image_size=32",
                         *FAST_IMAGES, "data.skip_bad_images=true")
    run(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"
