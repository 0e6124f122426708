"""`python predict.py ckpt_path=<checkpoint> images=<folder or file>`: a trained image
classifier's class and probability for each image, and the experts its patches went to."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(images: str) -> list[Path]:
    """The image files of a folder (sorted, not recursive), or the one file named."""
    path = Path(images).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"images={images} is neither a folder nor a file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"images={images} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(files: list[Path], transform: Callable, channels: int = 3) -> Tensor:
    """The images (as grayscale for 1 channel, else RGB) through the run's evaluation
    transform, stacked: (N, C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    tensors = []
    for file in files:
        try:
            with Image.open(file) as image:
                tensors.append(transform(image.convert("L" if channels == 1 else "RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"{file} is not a readable image ({type(exc).__name__})") from exc
    return torch.stack(tensors)


def experts_per_image(model: nn.Module, num_images: int) -> dict[int, Tensor]:
    """Per MoE layer, (N, E): the share of each image's tokens each expert processed, from the
    plans of the forward just run."""
    from moelab.callbacks.common import indexed_moe_layers  # FFN layers and attention mixtures (`1/attn`)

    shares = {}
    for index, layer in indexed_moe_layers(model):
        if layer.last_plan is None:
            continue
        share_TE = layer.last_plan.expert_share_TE().float().cpu()
        share_NE = share_TE.reshape(num_images, -1, share_TE.shape[-1]).sum(1)
        shares[index] = share_NE / share_NE.sum(-1, keepdim=True).clamp_min(1e-12)
    return shares


@torch.no_grad()
def predict(model: nn.Module, images_NCHW: Tensor, batch_size: int = 64) -> tuple[Tensor, dict[int, Tensor]]:
    """Class probabilities (N, classes) and each layer's (N, E) expert shares, in batches."""
    probs, shares = [], {}
    for batch in images_NCHW.split(batch_size):
        probs.append(model(batch).float().softmax(-1).cpu())
        for index, share in experts_per_image(model, batch.shape[0]).items():
            shares.setdefault(index, []).append(share)
    return torch.cat(probs), {index: torch.cat(parts) for index, parts in shares.items()}


def main_predict(cfg: Mapping[str, Any], out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """What predict.py runs: one line per image (file, class, probability, top experts per
    MoE layer); returns the same as records."""
    from hydra.utils import instantiate

    from moelab.tasks.checkpoint_io import model_from_state, read_model_state

    path = str(cfg["ckpt_path"])
    weights, config = read_model_state(path, "ckpt_path")
    model = model_from_state(weights, config, "ckpt_path", path)
    if hasattr(model, "generate"):
        raise ConfigError(f"ckpt_path={path} holds a language model: predict.py classifies images (for text: generate.py)")
    datamodule = instantiate(config["data"], _convert_="all")
    transform = getattr(datamodule, "eval_transform", None)
    if transform is None:
        raise ConfigError(f"the run's data ({config['data'].get('_target_')}) has no image transform for new images")
    out_file = cfg.get("out")
    if out_file is not None and Path(str(out_file)).suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"out={out_file}: name a .csv or .json file")
    files = image_files(str(cfg["images"]))
    images = load_images(files, transform(), int(getattr(datamodule, "in_chans", 3)))
    probs, shares = predict(model, images, int(cfg.get("batch_size", 64)))
    names = getattr(datamodule, "class_names", None) or [str(c) for c in range(probs.shape[1])]
    top = int(cfg.get("top_experts", 3))
    records = []
    for row, file in enumerate(files):
        prob, label = probs[row].max(0)
        experts = {index: [(int(e), float(share[row, e])) for e in share[row].argsort(descending=True)[:top]]
                   for index, share in shares.items()}
        records.append({"file": str(file), "class": names[int(label)], "probability": float(prob), "experts": experts})
        where = "; ".join(f"layer {i}: " + ", ".join(f"e{e} {s:.0%}" for e, s in pairs) for i, pairs in experts.items())
        out.write(f"{file.name}\t{names[int(label)]}\t{float(prob):.3f}\t{where}\n")
    out.flush()
    if out_file is not None:
        write_records(records, Path(str(out_file)).expanduser())
        sys.stderr.write(f"moelab: wrote {len(records)} predictions to {out_file}\n")
    return records


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    """Predictions as CSV (file, class, probability, then per MoE layer its top experts as
    `e3:0.41 e1:0.22`) or as JSON (the records as `main_predict` returns them)."""
    import csv
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([{**r, "experts": {str(i): [{"expert": e, "share": s} for e, s in pairs]
                                                      for i, pairs in r["experts"].items()}} for r in records], indent=1))
        return
    layers = sorted({i for r in records for i in r["experts"]}, key=str)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class", "probability", *(f"layer {i} experts" for i in layers)])
        for r in records:
            writer.writerow([r["file"], r["class"], f"{r['probability']:.6f}",
                             *(" ".join(f"e{e}:{s:.4f}" for e, s in r["experts"].get(i, [])) for i in layers)])
