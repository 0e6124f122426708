"""Heatmap images for TensorBoard (matplotlib, Agg): axis labels, a colour scale, a fixed pixel size."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

DPI = 80


def heatmap_size(num_rows: int, num_cols: int) -> tuple[int, int]:
    """(height, width) in pixels of the image `render_heatmap` makes for a rows × cols matrix."""
    width_in, height_in = _figure_inches(num_rows, num_cols)
    return int(height_in * DPI), int(width_in * DPI)


def _figure_inches(num_rows: int, num_cols: int) -> tuple[float, float]:
    """Figure size in whole quarter inches (exact in binary, so inches × DPI is an exact pixel count)."""
    width = min(16.0, max(5.0, 2.5 + 0.3 * num_cols))
    height = min(12.0, max(3.5, 1.5 + 0.22 * num_rows))
    return math.ceil(width * 4) / 4, math.ceil(height * 4) / 4


def column_shares(counts_RC: Tensor) -> Tensor:
    """Each column divided by its sum, so a column reads "what share of this expert's tokens
    fall in each row"; an empty column stays 0."""
    counts_RC = counts_RC.double()
    return counts_RC / counts_RC.sum(0, keepdim=True).clamp_min(1e-12)


def render_heatmap(
    values_RC: Tensor | np.ndarray,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """A rows × cols matrix as an RGB uint8 image (3, H, W), H × W = `heatmap_size(rows, cols)`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported on first use: ~0.4 s
    from matplotlib.figure import Figure

    values = values_RC.detach().cpu().double().numpy() if isinstance(values_RC, torch.Tensor) else np.asarray(values_RC)
    num_rows, num_cols = values.shape
    figure = Figure(figsize=_figure_inches(num_rows, num_cols), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    vmax = float(values.max()) if values.size and values.max() > 0 else 1.0
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=axes, label=colorbar_label, fraction=0.06, pad=0.03)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if col_labels is not None and num_cols <= 32:
        axes.set_xticks(range(num_cols), col_labels, fontsize=8)
    if row_labels is not None and num_rows <= 32:
        axes.set_yticks(range(num_rows), row_labels, fontsize=8)
    # Fixed margins in inches (tight_layout would cost a second layout pass, ~1/3 of the render).
    width_in, height_in = figure.get_size_inches()
    figure.subplots_adjust(left=1.3 / width_in, right=1 - 0.75 / width_in, bottom=0.6 / height_in, top=1 - 0.4 / height_in)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))
