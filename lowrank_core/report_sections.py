"""Report sections of the stages after feature extraction: detection head, low-rank nets, teacher, ΔW, LoRA grid.

Each builder reads the files its stage wrote; `stage_sections` picks the sections whose inputs are present.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .delta import accuracy_line
from .io import read_json
from .modalities import CLASSIFICATION, Score
from .report import ReportSection, figure_html, png_html, table
from .report_lora import LORA_INPUTS, lora_section
from .report_predictions import predictions_section

HEAD_INPUTS = ("metrics", "history", "heatmaps")
LOWRANK_INPUTS = ("comparison", "spatial", "history", "curve")
TEACHER_KEYS = ("steps", "final_loss", "final_val_loss", "best_val_loss", "device", "mixed_precision", "processes",
                "trainable_parameters", "train_seconds", "peak_memory_mb", "resumed_from_step")
HEAD_KEYS = ("best_epoch", "best_val_roc_auc", "selected_by", "pixel_masks", "parameters", "train_seconds", "device")


def stage_sections(inputs: dict[str, str], baseline: dict | None = None,
                   score: Score = CLASSIFICATION) -> list[ReportSection]:
    """The head, low-rank, teacher, ΔW and LoRA grid sections, in this order, each only when all its inputs are
    present (the grid's `lora_module_distance` is optional; `baseline` and `score` as in `lora_section`), then the
    predictions section where the evaluations wrote predictions."""
    sections = []
    if all(f"head_{name}" in inputs for name in HEAD_INPUTS):
        sections.append(head_section(*(inputs[f"head_{name}"] for name in HEAD_INPUTS)))
    archs = [key.removeprefix("lowrank_comparison_") for key in inputs if key.startswith("lowrank_comparison_")]
    runs = {arch: {name: inputs.get(f"lowrank_{name}_{arch}") for name in LOWRANK_INPUTS} for arch in archs}
    runs = {arch: files for arch, files in runs.items() if all(files.values())}
    if runs:
        sections.append(lowrank_section(runs))
    if "teacher" in inputs:
        sections.append(teacher_section(inputs["teacher"]))
    if "delta" in inputs:
        sections.append(delta_section(inputs["delta"]))
    if all(name in inputs for name in LORA_INPUTS):
        sections.append(lora_section(*(inputs[name] for name in LORA_INPUTS), inputs.get("lora_module_distance"),
                                     baseline, score))
        if "predictions" in pd.read_csv(inputs["lora_table"], nrows=0):
            sections.append(predictions_section(inputs["lora_table"], inputs["lora_references"]))
    return sections


def head_section(metrics_json: str | Path, history_csv: str | Path, heatmaps_png: str | Path) -> ReportSection:
    """Val / test classification and pixel metrics, the checkpoint choice, training curves and test heat maps."""
    metrics = read_json(metrics_json)
    history = pd.read_csv(history_csv)
    splits = [split for split in ("val", "test") if split in metrics]
    classification = [{"split": split, **metrics[split]["classification"]} for split in splits]
    pixel = [row for split in splits for row in _pixel_rows(split, metrics[split]["pixel"])]
    figure = Figure(figsize=(10, 3.4), layout="constrained")
    losses, auc = figure.subplots(1, 2)
    _plot_columns(losses, history, "epoch", ("train_loss", "val_loss"), ylabel="loss", title="loss per epoch")
    _plot_columns(auc, history, "epoch", ("val_roc_auc",), ylabel="ROC-AUC", title="val ROC-AUC")
    joint_start = history.loc[history["phase"] == "joint", "epoch"].min()
    for axis in (losses, auc):
        axis.axvline(joint_start - 0.5, color="black", ls=":", lw=0.8)  # the joint phase adds the localisation loss
        axis.axvline(metrics["best_epoch"], color="grey", ls="--", lw=0.8)
    intro = ("<p>Warm phase (classification only), then joint phase (dotted line; adds the localisation loss); the "
             "kept checkpoint (dashed line) is the best joint-phase epoch. Pixel metrics are pooled over the split "
             "(<em>_mean</em>: per image, an empty mask predicted empty counting as 1); <em>all_zero</em> is an "
             "all-zero prediction, the baseline a localiser has to beat.</p>")
    body = (intro + _key_values(metrics, HEAD_KEYS) + "<h3>Classification</h3>" + table(classification)
            + "<h3>Localisation (pixel level)</h3>" + table(pixel) + figure_html(figure, "head training curves")
            + "<h3>Test examples</h3>" + png_html(heatmaps_png, "test heat maps"))
    return ReportSection("Detection head", body, "head")


def lowrank_section(runs: dict[str, dict[str, str]]) -> ReportSection:
    """Per arch (files named as in `LOWRANK_INPUTS`): the comparison with the SVD, the training curve and the
    spatial comparison."""
    rows = {arch: _lowrank_row(read_json(files["comparison"]), read_json(files["history"]))
            for arch, files in runs.items()}
    names = next(iter(rows.values()))
    transposed = [{"": name, **{arch: row[name] for arch, row in rows.items()}} for name in names]
    intro = ("<p>Each net maps a test sample's tokens X to factors A·B of its effective rank. The per-sample "
             "truncated SVD at the same rank is the Eckart–Young optimum, so error ratios network / SVD ≥ 1 are "
             "expected: 1 is the best a net can do.</p>")
    figures = "".join(
        f"<details{' open' if i == 0 else ''}><summary>{html.escape(arch)}: training curve and spatial comparison"
        f"</summary>{png_html(files['curve'], f'{arch} loss curve')}{png_html(files['spatial'], f'{arch} vs SVD')}"
        "</details>" for i, (arch, files) in enumerate(runs.items()))
    return ReportSection("Low-rank feature decomposition", intro + table(transposed) + figures, "lowrank")


def _lowrank_row(comparison: dict, history: dict) -> dict:
    """One arch's column of the comparison table, from its `comparison.json` and `history.json`."""
    network, svd, ratio = comparison["network"], comparison["svd"], comparison["ratio"]
    return {
        "rank": comparison["rank"], "effective rank": comparison["effective_rank"],
        "MSE network": network["mse"], "MSE SVD": svd["mse"], "MSE ratio network / SVD": ratio["mse"],
        "rel. Frobenius error network": network["rel_frobenius"], "rel. Frobenius error SVD": svd["rel_frobenius"],
        "energy captured network": network["energy_captured"], "energy captured SVD": svd["energy_captured"],
        "seconds / sample network": network["seconds_per_sample"], "seconds / sample SVD": svd["seconds_per_sample"],
        "time ratio network / SVD": ratio["seconds_per_sample"],
        "best epoch": history["best_epoch"], "epochs run": history["epochs_run"], "stop reason": history["stop_reason"],
        "initial val MSE": history["initial_val_mse"], "best val MSE": history["best_val_mse"],
        "test samples": comparison["n_samples"], "device": comparison["device"],
    }


def teacher_section(teacher_dir: str | Path) -> ReportSection:
    """The teacher's training summary and its loss curve."""
    teacher_dir = Path(teacher_dir)
    summary = read_json(teacher_dir / "train_summary.json")
    figure = Figure(figsize=(7, 3.6), layout="constrained")
    _plot_columns(figure.subplots(), pd.read_csv(teacher_dir / "history.csv"), "step", ("loss", "val_loss"),
                  ylabel="LM loss", title="teacher loss")
    intro = (f"<p>Every parameter of <code>{html.escape(str(summary['model']))}</code> ({summary['dtype']}) "
             "fine-tuned: the reference the LoRA runs are measured against.</p>")
    return ReportSection("Teacher full fine-tune",
                         intro + _key_values(summary, TEACHER_KEYS) + figure_html(figure, "teacher loss curve"),
                         "teacher")


def delta_section(delta_dir: str | Path) -> ReportSection:
    """Energy captured at each rank per module group, the spectra and energy plots, and the text summary."""
    delta_dir = Path(delta_dir)
    result = read_json(delta_dir / "svd_analysis.json")
    groups = result["groups"]
    members = [("all", groups["all"])] + [item for grouping in ("by_tower", "by_kind", "by_tower_kind")
                                          for item in groups[grouping].items()]
    rows = [{"group": name, "modules": g["modules"], "parameters": g["parameters"], "‖ΔW‖_F": g["frobenius_norm"],
             "‖ΔW‖_F / ‖W_base‖_F": g["relative_change"],
             **{f"energy r={r}": g["energy"][str(r)] for r in result["ranks"]}} for name, g in members]
    intro = ("<p>ΔW = W_teacher − W_base of the targeted linear modules. <em>energy r</em>: Σσ²<sub>≤r</sub> / "
             "‖ΔW‖²<sub>F</sub> pooled over the group, the share of the fine-tune a rank-r LoRA initialised from the "
             "exported SVD factors reproduces (relative error √(1 − energy)). "
             + html.escape(accuracy_line(result)) + ".</p>")
    summary = html.escape((delta_dir / "svd_summary.txt").read_text())
    body = (intro + table(rows) + png_html(delta_dir / "spectrum.png", "ΔW singular values")
            + png_html(delta_dir / "energy_vs_rank.png", "ΔW energy vs rank")
            + f"<details><summary>svd_summary.txt</summary><pre>{summary}</pre></details>")
    return ReportSection("Is ΔW low-rank?", body, "delta")


def _key_values(mapping: dict, keys: tuple[str, ...]) -> str:
    """A two-column table of `keys` present in `mapping`."""
    return table([{"": key.replace("_", " "), "value": mapping[key]} for key in keys if key in mapping])


def _pixel_rows(split: str, pixel: dict) -> list[dict]:
    """The head's pixel metrics of `split`, then one row per baseline (the nested dicts, e.g. `all_zero`)."""
    baselines = {key: value for key, value in pixel.items() if isinstance(value, dict)}
    scalars = {key: value for key, value in pixel.items() if key not in baselines}
    return [{"split": split, "prediction": name, **values} for name, values in {"head": scalars, **baselines}.items()]


def _plot_columns(axis: Axes, frame: pd.DataFrame, x: str, columns: tuple[str, ...], **labels) -> None:
    """Each of `columns` against `x`, leaving out the rows where it is missing (e.g. steps without validation)."""
    for column in columns:
        rows = frame[[x, column]].dropna()
        if not rows.empty:
            axis.plot(rows[x], rows[column], marker="." if len(rows) <= 50 else None, label=column)
    axis.set(xlabel=x, **labels)
    if axis.lines:
        axis.legend(fontsize=8)
