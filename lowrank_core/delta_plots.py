"""Plots of a ΔW analysis (`svd_analysis.json` content): singular-value spectra and energy captured vs rank."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_spectra(result: dict, path: str | Path) -> None:
    """σ_i / σ_1 of every changed module (log scale), one colour per tower/kind group, configured ranks marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(sorted({f"{m['tower']}/{m['kind']}" for m in result["modules"]}))
    labelled = set()
    for module in result["modules"]:
        values = module["singular_values"]
        if not values or values[0] <= 0:
            continue
        group = f"{module['tower']}/{module['kind']}"
        ax.plot(range(1, len(values) + 1), [v / values[0] for v in values], color=colours[group], lw=0.8,
                alpha=0.4, label=None if group in labelled else group)
        labelled.add(group)
    for rank in result["ranks"]:
        ax.axvline(rank, color="grey", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="index i", ylabel="σ_i / σ_1", title="Singular values of ΔW per module")
    if labelled:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_energy(result: dict, path: str | Path) -> None:
    """Left: pooled energy vs rank per tower/kind group. Right: energy at each tower's layers for the largest rank."""
    ranks = result["ranks"]
    groups = result["groups"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
