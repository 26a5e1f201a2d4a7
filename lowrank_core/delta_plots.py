"""Plots of a ΔW analysis (`svd_analysis.json` content): singular-value spectra and energy captured vs rank.

Drawn for speed (they are part of every export): the Agg canvas, one line collection per module group, fixed
margins instead of a layout engine (which draws every tick label to measure it).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_spectra(result: dict, path: str | Path) -> None:
    """σ_i / σ_1 of every changed module (log scale), one colour per tower/kind group, configured ranks marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    lines: dict[str, list[np.ndarray]] = {}
    for module in result["modules"]:
        values = np.asarray(module["singular_values"])
        if values.size and values[0] > 0:
            index = np.flatnonzero(values > 0)  # a log scale has no place for exact zeros
            lines.setdefault(f"{module['tower']}/{module['kind']}", []).append(
                np.column_stack([index + 1, values[index] / values[0]]))
    colours = _colours(sorted(lines))
    for group, segments in sorted(lines.items()):
        ax.add_collection(LineCollection(segments, colors=colours[group], linewidths=0.8, alpha=0.4, label=group))
    for rank in result["ranks"]:
        ax.axvline(rank, color="grey", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="index i", ylabel="σ_i / σ_1", title="Singular values of ΔW per module")
    ax.autoscale_view()
    if lines:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_energy(result: dict, path: str | Path) -> None:
    """Left: pooled energy vs rank per tower/kind group. Right: energy at each tower's layers for the largest rank."""
    ranks = result["ranks"]
    groups = result["groups"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    curves = {"all": groups["all"], **groups["by_tower_kind"]}
    colours = _colours(list(curves))
    for name, stats in curves.items():
        points = [(r, stats["energy"][str(r)]) for r in ranks if stats["energy"][str(r)] is not None]
        if points:
            left.plot(*zip(*points), marker="o", color="black" if name == "all" else colours[name],
                      lw=2.5 if name == "all" else 1.2, label=name)
    left.set(xscale="log", xlabel="rank r", ylabel="energy Σσ²_r / ‖ΔW‖²_F", ylim=(0, 1.02),
             title="Energy captured by rank-r SVD")
    left.minorticks_off()
    left.set_xticks(ranks, [str(r) for r in ranks])
    left.legend(fontsize=8)
    top = str(ranks[-1])
    towers: dict[str, list[tuple[int, float]]] = {}
    for key, stats in groups["by_layer"].items():
        tower, layer = key.split("/")
        if stats["energy"][top] is not None:
            towers.setdefault(tower, []).append((int(layer), stats["energy"][top]))
    for tower, points in sorted(towers.items()):
        right.plot(*zip(*sorted(points)), marker=".", label=tower)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(xlabel="layer depth", ylabel=f"energy at r={top}", ylim=(0, 1.02), title="Energy per layer")
    if towers:
        right.legend(fontsize=8)
    _save(fig, path)


def _colours(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
