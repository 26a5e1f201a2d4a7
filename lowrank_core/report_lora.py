"""Report section of the LoRA ablation grid: the experiment table, full fine-tune vs LoRA, axis effects, loss curves.

Built from the grid's tables: `ablation.csv` (one row per arm × seed), `references.csv` (the base and teacher models)
and `ablation_history.csv` (the training curves, long form).
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .report import ReportSection, figure_html, table

AXES = ("objective", "preset", "init", "strategy")
AXIS_ORDER = {"objective": ("head", "head_frozen", "lm", "hybrid", "hybrid_frozen"),
              "init": ("random", "gaussian", "svd", "pissa", "olora")}  # the other axes keep their order in the grid
METRICS = ("roc_auc", "accuracy", "f1", "pixel_iou", "lm_loss", "delta_distance", "steps_to_target", "final_loss")
COST = ("trainable_parameters", "trainable_percent", "adapter_bytes", "peak_memory_mb", "samples_per_s",
        "train_seconds")
EFFECT_METRICS = ("roc_auc", "final_loss", "delta_distance", "samples_per_s")
COUNTS = ("seed", "steps_to_target", "trainable_parameters", "adapter_bytes")  # shown as integers
MISSING = "–"
SMOOTHING = 5  # steps of the rolling mean of the plotted training loss
LINESTYLES = ("-", "--", ":", "-.")

SORTABLE = """<style>table.sortable th{cursor:pointer}table.sortable th[data-order=asc]::after{content:" ▲"}
table.sortable th[data-order=desc]::after{content:" ▼"}</style>
<script>
document.querySelectorAll("table.sortable").forEach(function (table) {
  if (table.dataset.bound) return;
  table.dataset.bound = "1";
  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (th, column) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var ascending = th.dataset.order !== "asc";
      Array.prototype.forEach.call(headers, function (other) { delete other.dataset.order; });
      th.dataset.order = ascending ? "asc" : "desc";
      var key = function (row) {
        var text = row.cells[column].textContent.trim(), number = parseFloat(text);
        return text === "" || text === "\u2013" ? null : isNaN(number) ? text : number;
      };
      var rows = Array.prototype.slice.call(table.tBodies[0].rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);  // missing values last either way
        if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
        var order = typeof x === "number" ? x - y : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { table.tBodies[0].appendChild(row); });
    });
  });
});
</script>"""


def lora_section(ablation_csv: str | Path, references_csv: str | Path, history_csv: str | Path) -> ReportSection:
    """The sortable table of every arm × seed, full fine-tune vs LoRA, the effect of each axis and the loss curves
    by init."""
    runs = pd.read_csv(ablation_csv, dtype={axis: str for axis in AXES})
    references = pd.read_csv(references_csv).set_index("model")
    history = pd.read_csv(history_csv, dtype={axis: str for axis in AXES})
    intro = (f"<p>{len(runs)} LoRA runs: {runs.groupby(list(AXES)).ngroups} arms over {runs['seed'].nunique()} "
             f"seed(s), an arm being one value per axis ({', '.join(AXES)}). Classification scores come from the "
             "detection head or from the LM (<em>source</em>); <em>delta_distance</em> is "
             "‖ΔW<sub>LoRA</sub> − ΔW<sub>teacher</sub>‖<sub>F</sub> / ‖ΔW<sub>teacher</sub>‖<sub>F</sub>; "
             "<em>steps_to_target</em> the first step whose loss reached <em>target_loss</em> (– if never). "
             "Click a column header to sort.</p>")
    experiments = _sortable(runs[[*AXES, "seed", "source", *METRICS, *COST]], COUNTS)
    comparison = _sortable(_comparison(runs, references), ("trainable parameters", "storage bytes"))
    comparison_intro = (
        "<p>The teacher (every parameter fine-tuned) and the LoRA arms are trained and measured by the same pipeline "
        "on the same machine; per objective, the mean over its arms and seeds. Storage: the saved adapter (with the "
        "head, if any) for LoRA, the full model's weights for the teacher. Ratios are LoRA / teacher.</p>")
    effects_intro = (
        "<p>Each axis value's rows averaged over the other axes: mean ± std, the std across seeds of the per-seed "
        "means (the mean alone with one seed). The grid varies one factor at a time, so the other axes of a value's "
        "rows are mostly at their baseline: compare values within an axis, not across axes.</p>")
    curves_intro = (
        f"<p>Training loss, rolling mean over {SMOOTHING} steps, mean over seeds with the min–max band across seeds; "
        "one panel per objective (their losses differ in scale), one colour per init: do SVD / PiSSA / OLoRA starts "
        "converge faster than random ones?</p>")
    body = (intro + f"<details open><summary>{len(runs)} runs (arm × seed)</summary>{experiments}</details>"
            + "<h3>Full fine-tune vs LoRA</h3>" + comparison_intro + comparison
            + "<h3>Effect of each axis</h3>" + effects_intro + _sortable(_effects_display(axis_effects(runs)))
            + "<h3>Convergence by init</h3>" + curves_intro
            + figure_html(_loss_curves(history), "training loss by init") + SORTABLE)
    return ReportSection("LoRA ablation grid", body)


def axis_effects(runs: pd.DataFrame, metrics: tuple[str, ...] = EFFECT_METRICS) -> pd.DataFrame:
    """Per axis and value: its rows, its seeds, and per metric the mean and std across seeds of the per-seed means
    (columns `axis`, `value`, `rows`, `seeds`, `<metric> mean`, `<metric> std`)."""
    parts = []
    for axis in AXES:
        per_seed = runs.groupby([axis, "seed"])[list(metrics)].mean()
        stats = per_seed.groupby(level=axis).agg(["mean", "std"])
        stats.columns = [f"{metric} {stat}" for metric, stat in stats.columns]
        counts = runs.groupby(axis).agg(rows=("seed", "size"), seeds=("seed", "nunique"))
        part = counts.join(stats).reindex(_ordered(runs[axis], axis))
        parts.append(part.rename_axis("value").reset_index().assign(axis=axis))
    columns = ["axis", "value", "rows", "seeds", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))]
    return pd.concat(parts, ignore_index=True)[columns]


def _effects_display(effects: pd.DataFrame) -> pd.DataFrame:
    """`axis_effects` with each metric's mean and std in one "mean ± std" column."""
    metrics = [column.removesuffix(" mean") for column in effects if column.endswith(" mean")]
    shown = effects[["axis", "value", "rows", "seeds"]].copy()
    for metric in metrics:
        shown[metric] = [_plus_minus(mean, std)
                         for mean, std in zip(effects[f"{metric} mean"], effects[f"{metric} std"])]
    return shown


def _plus_minus(mean: float, std: float) -> str:
    """"mean ± std", the mean alone without a std, a dash without a mean."""
    if math.isnan(mean):
        return MISSING
    return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def _comparison(runs: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """The teacher and base rows, then per objective the mean of its LoRA runs, with LoRA / teacher ratios."""
    columns = {"trainable_parameters": "trainable parameters", "trainable_percent": "% trainable",
               "peak_memory_mb": "peak memory MB", "samples_per_s": "samples / s", "adapter_bytes": "storage bytes",
               "roc_auc": "ROC-AUC", "lm_loss": "LM loss"}
    models = [name for name in ("teacher", "base") if name in references.index]
    rows = references.loc[models].reindex(columns=["source", *columns])
    rows.index = [f"{name} ({'full fine-tune' if name == 'teacher' else 'untrained'})" for name in models]
    by_objective = runs.groupby("objective")
    lora = by_objective[list(columns)].mean().join(by_objective.agg(
        runs=("seed", "size"), source=("source", lambda s: "/".join(sorted(s.dropna().unique())))))
    lora = lora.reindex(_ordered(runs["objective"], "objective"))
    counts = lora.pop("runs")
    lora.index = [f"LoRA {objective} (mean of {n})" for objective, n in counts.items()]
    compared = pd.concat([rows, lora])
    teacher = references.reindex(["teacher"]).iloc[0]  # all missing without a teacher row
    for column, label in (("trainable_parameters", "params"), ("adapter_bytes", "storage"),
                          ("peak_memory_mb", "memory")):
        compared[f"{label} LoRA / teacher"] = (lora[column] / teacher.get(column, float("nan"))).reindex(compared.index)
    compared = compared.rename(columns={**columns, "source": "scores from"})
    return compared.rename_axis("model").reset_index()


def _loss_curves(history: pd.DataFrame) -> Figure:
    """One panel per objective: each arm's smoothed training loss against the step (mean over seeds, min–max band),
    coloured by init."""
    history = history.sort_values([*AXES, "seed", "step"])
    history["smoothed"] = history.groupby([*AXES, "seed"])["loss"].transform(
        lambda loss: loss.rolling(SMOOTHING, min_periods=1).mean())
    curves = history.groupby([*AXES, "step"])["smoothed"].agg(["mean", "min", "max"])
    inits = _ordered(history["init"], "init")
    objectives = _ordered(history["objective"], "objective")
    ncols = min(3, len(objectives))
    nrows = math.ceil(len(objectives) / ncols)
    figure = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.4), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).flat
    for objective, axis in zip(objectives, axes):
        arms = curves.loc[objective].reset_index()[["preset", "init", "strategy"]].drop_duplicates()
        arms = arms.sort_values("init", key=lambda column: column.map(inits.index), kind="stable")
        drawn = collections.Counter()  # arms of each init already drawn: they differ by line style
        for preset, init, strategy in arms.itertuples(index=False):
            curve = curves.loc[(objective, preset, init, strategy)]
            label = f"{init} ({preset}, {strategy})" if (arms["init"] == init).sum() > 1 else init
            colour = f"C{inits.index(init)}"
            axis.plot(curve.index, curve["mean"], color=colour, ls=LINESTYLES[drawn[init] % len(LINESTYLES)],
                      label=label)
            axis.fill_between(curve.index, curve["min"], curve["max"], color=colour, alpha=0.2, lw=0)
            drawn[init] += 1
        axis.set(title=objective, xlabel="step", ylabel="training loss")
        axis.legend(fontsize=7)
    for axis in axes:  # the panels left over in the last row
        axis.set_visible(False)
    figure.suptitle("training loss by init")
    return figure


def _ordered(values: pd.Series, axis: str) -> list[str]:
    """The distinct values of an axis: the known ones in their usual order, then the others as they first appear."""
    seen = list(dict.fromkeys(values.dropna()))
    known = AXIS_ORDER.get(axis, ())
    return [value for value in known if value in seen] + [value for value in seen if value not in known]


def _sortable(frame: pd.DataFrame, integers: tuple[str, ...] = ()) -> str:
    """An HTML table the page's script sorts by a clicked header, the `integers` columns rounded, missing values as
    a dash."""
    frame = frame.copy()
    for column in integers:
        frame[column] = frame[column].round().astype("Int64")
    records = frame.astype(object).where(frame.notna(), MISSING).to_dict("records")
    return table(records, list(frame.columns)).replace("<table>", '<table class="sortable">', 1)
