"""Example depth predictions as a figure: image, prediction, ground truth and absolute error, one row per example."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

PANEL_SIZE = 2.4  # inches


def depth_examples_figure(rows: list[dict], max_depth: float | None = None) -> Figure:
    """One figure row per dict {title, image, pred, gt, valid}: the image, the predicted depth, the ground truth
    (invalid pixels transparent) and |pred − gt| over valid pixels.

    `image` is [3, H, W] or [H, W, 3] in [0, 1]; `pred`, `gt` are [H, W] depths and `valid` an [H, W] mask. The two
    depth panels of a row share one colour scale, from the smallest to the largest depth over the valid pixels
    (the whole prediction when none is valid), capped at `max_depth` when given.
    """
    if not rows:
        raise ValueError("depth_examples_figure needs at least one example row")
    fig = Figure(figsize=(4 * PANEL_SIZE, len(rows) * PANEL_SIZE), layout="constrained")
    for row, ax in zip(rows, fig.subplots(len(rows), 4, squeeze=False)):
        _draw_row(fig, ax, row, max_depth)
    return fig


def _draw_row(fig, ax, row: dict, max_depth: float | None) -> None:
    pred, gt = np.asarray(row["pred"], dtype=float), np.asarray(row["gt"], dtype=float)
    valid = np.asarray(row["valid"], dtype=bool)
    shown = np.concatenate([pred[valid], gt[valid]]) if valid.any() else pred.ravel()
    low, high = float(shown.min()), float(shown.max())
    if max_depth is not None:
        high = min(high, max_depth)
        low = min(low, high)
    ax[0].imshow(_channels_last(np.asarray(row["image"], dtype=float)).clip(0, 1))
    ax[0].set_title(row["title"], fontsize=9)
    depth = ax[1].imshow(pred, cmap="viridis", vmin=low, vmax=high)
    ax[1].set_title("predicted depth", fontsize=9)
    ax[2].imshow(np.ma.masked_where(~valid, gt), cmap="viridis", vmin=low, vmax=high)
    ax[2].set_title("ground truth", fontsize=9)
    error = ax[3].imshow(np.ma.masked_where(~valid, np.abs(pred - gt)), cmap="inferno", vmin=0)
    ax[3].set_title("|pred − gt|", fontsize=9)
    fig.colorbar(depth, ax=ax[1:3], shrink=0.8, label="depth")
    fig.colorbar(error, ax=ax[3], shrink=0.8, label="abs. error")
    for panel in ax:
        panel.set_axis_off()


def _channels_last(image: np.ndarray) -> np.ndarray:
    """An [H, W, 3] view of a [3, H, W] or [H, W, 3] image."""
    return image if image.shape[-1] == 3 else image.transpose(1, 2, 0)
