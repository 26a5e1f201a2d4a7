"""Plots of the low-rank projection nets: the training curve and the spatial comparison with the truncated SVD."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from .io import atomic_path


def plot_loss_curve(history: dict, path: str | Path) -> None:
    """Train and val MSE per epoch (log scale) with the best epoch and the start of an extra-epochs continuation
    marked; the effective rank on a second axis when it changes (AdaLoRA)."""
    records = history["epochs"]
    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axis = figure.subplots()
    axis.plot(epochs, [r["train_mse"] for r in records], label="train MSE")
    axis.plot(epochs, [r["val_mse"] for r in records], label="val MSE")
    if history["best_epoch"] is not None:
        axis.axvline(history["best_epoch"], color="grey", ls="--", lw=0.8, label=f"best epoch {history['best_epoch']}")
    for segment in history["segments"][1:]:
        axis.axvline(segment["start_epoch"] + 0.5, color="black", ls=":", lw=0.8,
                     label=f"extra epochs from epoch {segment['from_best_epoch']}")
    axis.set(yscale="log", xlabel="epoch", ylabel="reconstruction MSE",
             title=f"{history['arch']} (rank {history['rank']}): {history['stop_reason']}")
    ranks = [r["effective_rank"] for r in records]
    if len(set(ranks)) > 1:
        twin = axis.twinx()
        twin.step(epochs, ranks, where="post", color="tab:green", lw=0.8)
        twin.set_ylabel("effective rank", color="tab:green")
    axis.legend(fontsize=8)
    _save(figure, path)


def plot_spatial_comparison(original: torch.Tensor, svd: torch.Tensor, network: torch.Tensor, grid_h: int,
                            grid_w: int, path: str | Path, title: str, channels: int = 8) -> None:
    """The first `channels` channels of one sample [T, C] laid out on its grid_h x grid_w token grid: original,
    SVD and network reconstructions (shared colour scale per channel), then |error| of each (shared scale)."""
    channels = min(channels, original.shape[-1])
    maps = {name: values[:, :channels].T.reshape(channels, grid_h, grid_w).float()
            for name, values in (("original", original), ("SVD", svd), ("network", network))}
    rows = [*maps.items(), ("|original − SVD|", (maps["original"] - maps["SVD"]).abs()),
            ("|original − network|", (maps["original"] - maps["network"]).abs())]
    figure = Figure(figsize=(1.6 * channels + 1.5, 1.6 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), channels, squeeze=False)
    for channel in range(channels):
        value_range = torch.stack([m[channel] for m in maps.values()])
        error_max = max(rows[3][1][channel].max().item(), rows[4][1][channel].max().item())
        for row, (name, values) in enumerate(rows):
            is_error = row >= len(maps)
            image = axes[row, channel].imshow(
                values[channel], cmap="magma" if is_error else "viridis",
                vmin=0.0 if is_error else value_range.min().item(),
                vmax=error_max if is_error else value_range.max().item())
            axes[row, channel].set_xticks([])
            axes[row, channel].set_yticks([])
            if row == 0:
                axes[row, channel].set_title(f"channel {channel}", fontsize=9)
            if channel == 0:
                axes[row, channel].set_ylabel(name, fontsize=9)
        figure.colorbar(image, ax=axes[len(maps):, channel], shrink=0.8)
    figure.suptitle(title)
    _save(figure, path)


def _save(figure: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
