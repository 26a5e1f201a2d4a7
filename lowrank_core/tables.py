"""The ablation tables: every arm's evaluation and training history, and the references, collected into CSVs for
the report. Apart from the evaluation (`lora_eval`), so that the job writing them loads no model library."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from .grid import AXES, arm_path
from .io import atomic_path, read_json
from .modalities import get_modality

log = logging.getLogger(__name__)

TRAIN_KEYS = ("lr", "max_steps", "batch_size")  # the arm's optimisation settings, as table columns
COST_KEYS = ("trainable_parameters", "total_parameters", "trainable_percent", "adapter_bytes", "peak_memory_mb",
             "train_seconds", "samples_per_s", "init_seconds", "init_peak_memory_mb")  # init_*: `lora.start_student`


def flat_row(metrics: dict, modality) -> dict:
    """One table row of an evaluation: the modality's metric columns, convergence, ΔW distance and cost columns."""
    row = modality.table_row(metrics)
    row |= metrics.get("convergence") or {}
    row["delta_distance"] = (metrics.get("delta") or {}).get("relative_distance")
    row |= {"general_loss": metrics["general_text"]["loss"]} if "general_text" in metrics else {}
    row |= {k: (metrics.get("train") or {}).get(k) for k in TRAIN_KEYS} | (metrics.get("adapter") or {})
    return row | {k: metrics["cost"].get(k) for k in COST_KEYS}


def _predictions_link(path: Path, tables_dir: Path) -> dict:
    return {"predictions": os.path.relpath(path, tables_dir)} if path.exists() else {}


def collect(arms: list[dict], eval_jsons: list[str | Path], histories: list[str | Path],
            references: dict[str, str | Path], out_csv: str | Path, references_csv: str | Path,
            history_csv: str | Path, module_distance_csv: str | Path, modality: str) -> pd.DataFrame:
    """Write one row per trained arm × seed (`objective, preset, init, strategy, seed` + metrics, and `predictions`:
    the path of its predictions.csv relative to the tables, where it wrote one), the reference rows (with the `rank`
    of the ΔW_r ones, and their `predictions`), every arm's training history in long form, and the ΔW distance of every
    arm × seed per module group (tower, kind, layer) in long form. Returns the arm table."""
    evaluations = [read_json(path) for path in eval_jsons]
    modality = get_modality(modality)
    keys = [{a: arm[a] for a in (*AXES, "seed")} for arm in arms]
    tables_dir = Path(out_csv).parent
    table = pd.DataFrame([{**key, **flat_row(metrics, modality),
                           **_predictions_link(Path(path).with_name("predictions.csv"), tables_dir)}
                          for key, metrics, path in zip(keys, evaluations, eval_jsons)])
    reference_table = pd.DataFrame([
        {"model": name, "rank": metrics.get("rank"), **flat_row(metrics, modality),
         **_predictions_link(Path(path).with_name(f"{Path(path).stem}_predictions.csv"), tables_dir)}
        for name, path in references.items() for metrics in [read_json(path)]])
    if "general_loss" in reference_table:  # forgetting: the general-text loss over the base's
        base_loss = reference_table.set_index("model").at["base", "general_loss"]
        for frame in (table, reference_table):
            frame["forgetting"] = frame["general_loss"] - base_loss
    distance = pd.DataFrame([{**key, **group} for key, metrics in zip(keys, evaluations)
                             for group in (metrics.get("delta") or {}).get("groups", [])],
                            columns=[*AXES, "seed", "tower", "kind", "layer", "relative_distance"])
    curves = pd.concat([pd.read_csv(path).assign(arm=arm_path(arm), **{a: arm[a] for a in (*AXES, "seed")})
                        for arm, path in zip(arms, histories)], ignore_index=True)
    for frame, path in ((table, out_csv), (reference_table, references_csv), (curves, history_csv),
                        (distance, module_distance_csv)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    log.info("%d arms collected into %s", len(table), out_csv)
    return table
