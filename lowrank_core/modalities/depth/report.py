"""The depth modality's report sections: its dataset (scenes, windows per split) and `<section id="depth">`, the
metrics and cost per strategy against the base and the teacher, with example frames."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ...grid import AXES
from ...io import read_json
from ...report import ReportSection, figure_html, table
from ...report_lora import arm_means, read_grid_table
from .plots import depth_examples_figure

SHOWN = ("abs_rel", "delta1", "rmse", "mae", "laser_abs_rel", "laser_delta1", "test_loss")
COSTS = ("trainable_percent", "trainable_parameters", "peak_memory_mb", "samples_per_s", "train_seconds")
SPLITS = ("train", "val", "test")


def dataset_section(manifest: dict) -> ReportSection:
    """Windows per split and per scene (with the windows dropped for too few valid depth pixels)."""
    splits = [{"split": split, "windows": manifest["splits"][split]["count"]} for split in SPLITS]
    scenes = [{"scene": scene["name"], "images": scene["images"], "laser depth": scene["laser"],
               "masks": scene["masks"], **{f"{split} windows": scene["windows"][split] for split in SPLITS},
               "dropped windows": scene["dropped_windows"]} for scene in manifest["scenes"]]
    record = manifest["splits"]["train"]["records"][0]
    intro = (f"<p>Source: <code>{html.escape(str(manifest['source']))}</code>. Sequences of "
             f"{len(record['frames'])} frames at {record['image_size'][0]}×{record['image_size'][1]} (H×W), depths "
             f"clipped to {record['depth_range'][0]:g}–{record['depth_range'][1]:g} m; each scene's image order is cut "
             "into contiguous train / val / test blocks, so no window straddles two splits.</p>")
    warnings = manifest.get("warnings", [])
    notes = ("<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings[:20]) + "</ul>") if warnings else ""
    return ReportSection("Dataset", intro + table(splits) + table(scenes) + notes, "dataset")


def results_section(inputs: dict) -> ReportSection:
    """`<section id="depth">`: per arm (its strategy, preset, init) the depth metrics and cost as mean ± std over
    seeds, next to the base, the teacher and the ΔW_r references, and example test frames of each."""
    runs = read_grid_table(inputs["lora_table"])
    references = pd.read_csv(inputs["lora_references"]).set_index("model")
    columns = [c for c in (*SHOWN, *COSTS) if c in runs]
    means = arm_means(runs, tuple(columns))
    rows = [{"model": name, **{c: references.at[name, c] for c in columns if c in references}}
            for name in references.index]
    seeds = runs.groupby(list(AXES), sort=False)["seed"].nunique().to_numpy()
    rows += [{"model": arm, "seeds": int(n), **{c: _mean_std(means.loc[arm], c) for c in columns}}
             for arm, n in zip(means.index, seeds)]
    intro = ("<p>Depth metrics on the test windows, per frame then averaged: against the COLMAP points projected "
             "into each frame (valid where the mask does not exclude them from evaluation) and, prefixed "
             "<em>laser_</em>, against the laser depth where the scenes have it. AbsRel, RMSE and MAE: lower is "
             "better; δ1 (share of pixels within ×1.25): higher is better. Arms: mean ± std over seeds; the "
             "references are single evaluations. Cost: trainable share, peak memory, training throughput.</p>")
    body = intro + table(rows, ["model", "seeds", *columns])
    examples = _example_rows(inputs.get("evaluations", []))
    if examples:
        body += ("<p>The first test frame of each model (seed 0 of each arm): the image, the predicted depth, the "
                 "ground truth and the absolute error.</p>" + figure_html(depth_examples_figure(examples),
                                                                         "example depth predictions"))
    return ReportSection("Depth: metrics and cost per strategy", body, "depth")


def _mean_std(row: pd.Series, column: str) -> str:
    mean, std = row.get(f"{column} mean"), row.get(f"{column} std")
    if pd.isna(mean):
        return "–"
    return f"{mean:.4g}" if pd.isna(std) else f"{mean:.4g} ± {std:.2g}"


def _example_rows(evaluations: list[str]) -> list[dict]:
    """The first example frame of the base, the teacher and each arm's first seed, from their evaluation JSONs."""
    rows, seen = [], set()
    paths = sorted(map(Path, evaluations), key=lambda path: "references" not in path.parts)  # base, teacher first
    for path in paths:
        parts = path.parts[path.parts.index("eval") + 1:]
        name = path.stem if parts[0] == "references" else "/".join(parts[:len(AXES)])
        if name in seen or (parts[0] == "references" and name not in ("base", "teacher")):
            continue
        examples = read_json(path).get("examples") or []
        if examples:
            seen.add(name)
            rows.append({"title": name, **examples[0]})
    return rows

