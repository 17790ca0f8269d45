"""Pictures a run leaves in its workdir: image grids and curves, as PNG."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Tiles [N, H, W, C] images (float in `value_range`, or uint8) into one uint8 [H', W', C]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        lo, hi = value_range
        images = np.clip((images.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
        images = np.round(images * 255).astype(np.uint8)
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = im
    return grid


def save_image_grid(path: str, images: np.ndarray, ncols: int | None = None, scale: int = 3,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> str:
    """Writes `image_grid(images)` to `path` as a PNG, each pixel shown as scale x scale."""
    grid = image_grid(images, ncols, value_range=value_range)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    picture.save(tmp)
    os.replace(tmp, path)
    return path


def save_curves(path: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str = "step", ylabel: str = "", title: str = "", logy: bool = False) -> str:
    """Plots named (x, y) curves on one axis and writes the figure to `path` as a PNG."""
    fig = Figure(figsize=(7, 4.5), dpi=100)  # no pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path
