"""Report section of the LoRA ablation grid: the experiment table, full fine-tune vs LoRA, axis effects against the
baseline arm, score against cost, score against a swept rank or learning rate, ΔW distance per module group, loss
curves.

Built from the grid's tables: `ablation.csv` (one row per arm × seed), `references.csv` (the base, the teacher and
the teacher's rank-r ΔW merged into the base), `ablation_history.csv` (the training curves, long form) and, when
present, `module_distance.csv` (ΔW distance per arm × seed × module group, long form).
"""

from __future__ import annotations

import collections
import html
import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .grid import AXES, DEFAULT_LR, INITS
from .modalities import CLASSIFICATION, Score
from .report import ReportSection, figure_html, table
from .stats import CONFIDENCE, arm_label, axis_comparisons, infer_baseline

LORA_INPUTS = ("lora_table", "lora_references", "lora_history")  # the section's required inputs, in argument order
AXIS_ORDER = {"objective": ("head", "head_frozen", "lm", "hybrid", "hybrid_frozen"),
              "init": INITS}  # the other axes keep their order in the grid
METRICS = ("roc_auc", "accuracy", "f1", "exact_match", "numeric_accuracy", "pixel_iou", "lm_loss", "abs_rel", "delta1",
           "rmse", "mae", "laser_abs_rel", "laser_delta1", "test_loss", "delta_distance", "steps_to_target",
           "final_loss", "label_blind_loss", "positive_rate", "generated_accuracy", "general_loss", "forgetting")
COST = ("trainable_parameters", "trainable_percent", "adapter_bytes", "peak_memory_mb", "samples_per_s",
        "train_seconds", "init_seconds", "init_peak_memory_mb")
SETTINGS = ("rank", "alpha", "lr", "max_steps")
EFFECT_METRICS = (("final_loss", False), ("delta_distance", False), ("samples_per_s", True))  # after the score
EFFECT_KEYS = ("Δ", "ci_low", "ci_high", "verdict")
PARETO_COSTS = (("trainable_parameters", "trainable parameters"), ("peak_memory_mb", "peak memory (MB)"),
                ("train_seconds", "train time (s)"))
COUNTS = ("seed", "steps_to_target", "trainable_parameters", "adapter_bytes", "max_steps", "rank")  # shown as integers
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


def read_grid_table(path: str | Path) -> pd.DataFrame:
    """One of the grid's CSV tables, its axis columns read as text (a preset named "1" stays "1")."""
    return pd.read_csv(path, dtype={axis: str for axis in AXES})


def lora_section(ablation_csv: str | Path, references_csv: str | Path, history_csv: str | Path,
                 module_distance_csv: str | Path | None = None, baseline: dict | None = None,
                 score: Score = CLASSIFICATION) -> ReportSection:
    """The sortable table of every arm × seed, full fine-tune vs LoRA, the effect of each axis against the
    `baseline` arm (inferred when None, see `stats.infer_baseline`), the Pareto figure of `score` against cost, ΔW
    distance per module group (with `module_distance_csv`) and the loss curves by init."""
    runs = read_grid_table(ablation_csv)
    references = pd.read_csv(references_csv).set_index("model")
    history = read_grid_table(history_csv)
    baseline = baseline or infer_baseline(runs)
    intro = (f"<p>{len(runs)} LoRA runs: {runs.groupby(list(AXES)).ngroups} arms over {runs['seed'].nunique()} "
             f"seed(s), an arm being one value per axis ({', '.join(AXES)}). Classification scores come from the "
             "detection head or from the LM (<em>source</em>); <em>delta_distance</em> is "
             "‖ΔW<sub>LoRA</sub> − ΔW<sub>teacher</sub>‖<sub>F</sub> / ‖ΔW<sub>teacher</sub>‖<sub>F</sub>; "
             "<em>final_loss</em> the training loss's mean over the last 5 steps; <em>steps_to_target</em> the first "
             "step whose 5-step mean reached <em>target_loss</em> (– if never); "
             "<em>init_seconds</em> / <em>init_peak_memory_mb</em> what reaching the start cost before training: "
             "eva / corda / lora_ga's preprocessing of training data, svd's full fine-tune and ΔW export; "
             "<em>positive_rate</em> the share of test samples predicted positive. Click a column header to sort.</p>")
    shown = [column for column in (*AXES, "seed", "source", *METRICS, *COST, *SETTINGS) if column in runs]
    experiments = _sortable(runs[shown], COUNTS)
    comparison = _sortable(_comparison(runs, references, score), ("trainable parameters", "storage bytes"))
    comparison_intro = (
        "<p>The teacher (every parameter fine-tuned) and the LoRA arms are trained and measured by the same pipeline "
        "on the same machine; per objective, the mean over its arms and seeds. <em>teacher_r</em> rows are the base "
        "with the teacher's ΔW truncated to rank r merged in, untrained. Storage: the saved adapter (with the head, "
        "if any) for LoRA, the full model's weights for the teacher. Ratios are LoRA / teacher. The references' "
        "95% interval is over the test samples (DeLong's, for ROC-AUC); the arms' seed intervals are in the "
        "effects table below.</p>")
    effects_intro = (
        f"<p>Each value of an axis against the baseline arm <code>{html.escape(arm_label(baseline))}</code>, the "
        "other axes at the baseline's, paired by seed: the value's mean, then Δ = value − baseline over the "
        f"seeds both ran with its {CONFIDENCE:.0%} t-interval, and the verdict (<em>better</em> / <em>worse</em>: "
        "the interval excludes 0; <em>within noise</em>: it contains 0; <em>undetermined</em>: under two seeds). "
        "Lower is better for final_loss and delta_distance. Values only in arms that differ from the baseline on "
        "two axes are not compared.</p>")
    curves_intro = (
        f"<p>Training loss, rolling mean over {SMOOTHING} steps, mean over seeds with the min–max band across seeds; "
        "one panel per objective (their losses differ in scale), one colour per init: do SVD / PiSSA / OLoRA starts "
        "converge faster than random ones?</p>")
    distance = _module_distance(read_grid_table(module_distance_csv)) if module_distance_csv else ""
    body = (intro + f"<details open><summary>{len(runs)} runs (arm × seed)</summary>{experiments}</details>"
            + '<h3 id="lora-comparison">Full fine-tune vs LoRA</h3>' + comparison_intro + comparison
            + '<h3 id="effects">Effect of each axis</h3>' + effects_intro
            + _sortable(_effects_display(axis_effects(runs, baseline, ((score.column, score.higher_is_better),
                                                                      *EFFECT_METRICS))))
            + _pareto(runs, references, score) + _sweeps(runs, baseline, score) + distance
            + '<h3 id="convergence">Convergence by init</h3>' + curves_intro
            + figure_html(_loss_curves(history), "training loss by init") + SORTABLE)
    return ReportSection("LoRA ablation grid", body, "lora")


def axis_effects(runs: pd.DataFrame, baseline: dict,
                 metrics: tuple[tuple[str, bool], ...] = (("roc_auc", True), *EFFECT_METRICS)) -> pd.DataFrame:
    """Per axis and value compared with the baseline (`stats.axis_comparisons`): `axis`, `value`, `reference`,
    `seeds` (the most paired seeds over the metrics), and per metric `<metric>` (the value's mean over the paired
    seeds), `<metric> Δ`, `<metric> ci_low`, `<metric> ci_high`, `<metric> verdict`."""
    keys = ["axis", "value", "reference"]
    parts = [axis_comparisons(runs, baseline, metric, higher_is_better).set_index(keys)[
        ["n", "value_mean", "mean", "ci_low", "ci_high", "verdict"]].set_axis(
        [f"{metric} n", metric, *(f"{metric} {key}" for key in EFFECT_KEYS)], axis=1)
        for metric, higher_is_better in metrics]
    effects = pd.concat(parts, axis=1)
    counts = [f"{metric} n" for metric, _ in metrics]
    effects.insert(0, "seeds", effects[counts].max(axis=1))
    return effects.drop(columns=counts).reset_index()


def _effects_display(effects: pd.DataFrame) -> pd.DataFrame:
    """`axis_effects` with each metric's Δ and interval in one "Δ [low, high]" column."""
    metrics = [column.removesuffix(" verdict") for column in effects if column.endswith(" verdict")]
    shown = effects[["axis", "value", "reference", "seeds"]].copy()
    for metric in metrics:
        shown[metric] = effects[metric]
        intervals = effects[[f"{metric} {k}" for k in ("Δ", "ci_low", "ci_high")]].to_numpy()
        shown[f"{metric} Δ [{CONFIDENCE:.0%} CI]"] = [format_interval(*values) for values in intervals]
        shown[f"{metric} verdict"] = effects[f"{metric} verdict"]
    return shown


def format_interval(mean: float, low: float, high: float, spec: str = "+.3g") -> str:
    """"mean [low, high]" (signed by default), the mean alone without an interval, a dash without a mean."""
    if math.isnan(mean):
        return MISSING
    return f"{mean:{spec}}" if math.isnan(low) else f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def arm_means(runs: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """Per arm (indexed by its label), the mean and the std over seeds of each of `columns` (`<column> mean`,
    `<column> std`)."""
    grouped = runs.groupby(list(AXES), sort=False)[list(columns)].agg(["mean", "std"])
    grouped.columns = [f"{column} {stat}" for column, stat in grouped.columns]
    grouped.index = [arm_label(dict(zip(AXES, arm))) for arm in grouped.index]
    return grouped


def pareto_front(score: pd.Series, cost: pd.Series) -> pd.Series:
    """Whether each point is on the Pareto frontier: no other point scores at least as high at no more cost and is
    strictly better on one of the two. Points missing either value are not on it."""
    valid = score.notna() & cost.notna()
    return pd.Series([bool(valid[i]) and not any(
        valid[j] and score[j] >= score[i] and cost[j] <= cost[i] and (score[j] > score[i] or cost[j] < cost[i])
        for j in score.index) for i in score.index], index=score.index)


def _pareto(runs: pd.DataFrame, references: pd.DataFrame, score: Score = CLASSIFICATION) -> str:
    """Test `score` against each cost in `PARETO_COSTS`, one point per arm (mean over seeds, error bars the std
    across seeds), the frontier circled and listed, the teacher and base scores as horizontal lines."""
    metric = score.column
    costs = [cost for cost, _ in PARETO_COSTS if cost in runs]
    if metric not in runs or runs[metric].isna().all() or not costs:
        return ""
    means = arm_means(runs, (metric, *costs))
    figure = Figure(figsize=(4.2 * len(costs), 3.6), layout="constrained")
    fronts = []
    for axis, cost in zip(figure.subplots(1, len(costs), squeeze=False).flat, costs):
        value, spend = means[f"{metric} mean"], means[f"{cost} mean"]
        front = pareto_front(value if score.higher_is_better else -value, spend)
        axis.errorbar(spend, value, yerr=means[f"{metric} std"], xerr=means[f"{cost} std"], fmt="o", ms=4,
                      color="C0", ecolor="C0", elinewidth=0.8, alpha=0.8, label="LoRA arm")
        ordered = means[front].sort_values(f"{cost} mean")
        axis.plot(ordered[f"{cost} mean"], ordered[f"{metric} mean"], "o-", mfc="none", ms=10, color="C3",
                  drawstyle="steps-post", label="Pareto frontier")
        for label, row in ordered.iterrows():
            axis.annotate(label, (row[f"{cost} mean"], row[f"{metric} mean"]), fontsize=6, xytext=(3, 3),
                          textcoords="offset points")
        for model, style in (("teacher", "--"), ("base", ":")):
            if model in references.index and pd.notna(references.at[model, metric]):
                axis.axhline(references.at[model, metric], color="black", ls=style, lw=0.9, label=model)
        if spend.min() > 0 and spend.max() / spend.min() > 100:
            axis.set_xscale("log")
        axis.set(xlabel=dict(PARETO_COSTS)[cost], ylabel=f"test {metric}")
        axis.legend(fontsize=7)
        fronts.append(f"<li>{html.escape(dict(PARETO_COSTS)[cost])}: "
                      + ", ".join(f"<code>{html.escape(label)}</code>" for label in ordered.index) + "</li>")
    figure.suptitle(f"test {metric} against cost, one point per arm")
    intro = (f"<p>Test {metric} against cost, one point per arm: mean over seeds, error bars the std across seeds. "
             "An arm is on the Pareto frontier (circled) when no other arm scores at least as well for no more "
             f"cost ({'higher' if score.higher_is_better else 'lower'} is better); dashed line: the teacher, dotted: "
             "the base. Frontier, cheapest first:</p>")
    return (f'<div id="pareto"><h3>Score against cost</h3>{intro}<ul>{"".join(fronts)}</ul>'
            + figure_html(figure, f"test {metric} against cost") + "</div>")


def _sweeps(runs: pd.DataFrame, baseline: dict, score: Score = CLASSIFICATION) -> str:
    """Test `score` against the swept rank (`lora.grid.ranks`: the baseline's preset at each rank) and against the
    swept learning rate (`lora.grid.lrs`), each with the other axes but init and objective at the baseline's: can
    the winning init flip with the rank or the lr? Empty without a sweep."""
    same = (runs["strategy"] == baseline["strategy"])
    base_preset = re.sub(r"-r\d+$", "", baseline["preset"])
    ranked = runs[same & (runs["learning_rate"] == baseline["learning_rate"])
                  & runs["preset"].str.fullmatch(rf"{re.escape(base_preset)}-r\d+")]
    rates = runs[same & (runs["preset"] == baseline["preset"]) & (runs["learning_rate"] != DEFAULT_LR)]
    held = f"strategy {baseline['strategy']}"
    return (_sweep(ranked, "rank", "rank r", "rank", f"preset {base_preset} (alpha by lora.grid.rank_alpha), {held}",
                   score)
            + _sweep(rates, "lr", "learning rate", "learning-rate", f"preset {baseline['preset']}, {held}", score))


def _sweep(runs: pd.DataFrame, x: str, name: str, anchor: str, held: str, score: Score) -> str:
    """Test `score` against the numeric column `x` of `runs`, one panel per objective, one line per init: mean over
    seeds, error bars the std across seeds. Empty under two values of `x`."""
    metric = score.column
    if metric not in runs or x not in runs or runs[x].nunique() < 2:
        return ""
    objectives, inits = _ordered(runs["objective"], "objective"), _ordered(runs["init"], "init")
    figure = Figure(figsize=(4.2 * len(objectives), 3.4), layout="constrained")
    for axis, objective in zip(figure.subplots(1, len(objectives), squeeze=False).flat, objectives):
        for init in inits:
            points = runs[(runs["objective"] == objective) & (runs["init"] == init)].groupby(x)[metric]
            if points.ngroups:
                axis.errorbar(points.mean().index, points.mean(), yerr=points.std(), marker="o", ms=4, capsize=2,
                              color=f"C{inits.index(init)}", label=init)
        axis.set(xscale="log", title=objective, xlabel=name, ylabel=f"test {metric}")
        axis.legend(fontsize=7)
    figure.suptitle(f"test {metric} against {name}, by init")
    intro = (f"<p>Test {metric} against the {name} ({html.escape(held)}; the same steps, schedule and batch "
             "throughout): mean over seeds, error bars the std across seeds. Where the lines cross, which init wins "
             f"depends on the {name}.</p>")
    return (f'<div id="{anchor}"><h3>Score against {name}</h3>' + intro
            + figure_html(figure, f"test {metric} against {name}") + "</div>")


def _module_distance(distance: pd.DataFrame) -> str:
    """ΔW distance to the teacher per arm: a table and heat map per module group (tower/kind, mean over the group's
    layers), and a figure per layer (mean over kinds), one panel per tower with layers; means over seeds."""
    distance = distance.assign(arm=[arm_label(row) for row in distance[list(AXES)].to_dict("records")],
                               group=distance["tower"] + "/" + distance["kind"])
    arms = list(dict.fromkeys(distance["arm"]))
    per_seed = distance.groupby(["arm", "group", "layer", "seed"], dropna=False)["relative_distance"].mean()
    by_group = (per_seed.groupby(level=["arm", "group", "layer"], dropna=False).mean()
                .groupby(level=["arm", "group"]).mean().unstack("group").reindex(arms))
    layered = distance.dropna(subset=["layer"])
    by_layer = layered.groupby(["tower", "arm", "layer", "seed"])["relative_distance"].mean().groupby(
        level=["tower", "arm", "layer"]).mean()
    towers = list(dict.fromkeys(layered["tower"]))
    figure = Figure(figsize=(4.5 + 0.6 * by_group.shape[1] + 4.2 * len(towers), max(3.2, 0.9 + 0.3 * len(arms))),
                    layout="constrained")
    heat, *lines = figure.subplots(1, 1 + len(towers), squeeze=False).flat
    image = heat.imshow(by_group.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    heat.set(xticks=range(by_group.shape[1]), yticks=range(len(arms)), title="per module group")
    heat.set_xticklabels(by_group.columns, rotation=45, ha="right", fontsize=7)
    heat.set_yticklabels(arms, fontsize=7)
    figure.colorbar(image, ax=heat, label="relative distance")
    for axis, tower in zip(lines, towers):
        for index, arm in enumerate(arms):
            if (tower, arm) in by_layer.index.droplevel("layer"):
                curve = by_layer.loc[(tower, arm)]
                axis.plot(curve.index, curve.to_numpy(), marker=".", color=f"C{index % 10}",
                          ls=LINESTYLES[index // 10 % len(LINESTYLES)], label=arm)
        axis.set(title=f"{tower} per layer", xlabel="layer", ylabel="relative distance")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if lines:
        lines[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    intro = ("<p>‖ΔW<sub>LoRA</sub> − ΔW<sub>teacher</sub>‖<sub>F</sub> / ‖ΔW<sub>teacher</sub>‖<sub>F</sub> per "
             "module group: where each arm lands close to the teacher's change and where it does not. Per group "
             "(tower/kind) the mean over the group's layers, per layer the mean over kinds; means over seeds.</p>")
    return ('<div id="module-distance"><h3>ΔW distance by module group</h3>' + intro
            + _sortable(by_group.rename_axis("arm").reset_index()) + figure_html(figure, "ΔW distance by module group")
            + "</div>")


def _comparison(runs: pd.DataFrame, references: pd.DataFrame, score: Score = CLASSIFICATION) -> pd.DataFrame:
    """The teacher and base rows, then per objective the mean of its LoRA runs, with LoRA / teacher ratios."""
    columns = {"trainable_parameters": "trainable parameters", "trainable_percent": "% trainable",
               "peak_memory_mb": "peak memory MB", "samples_per_s": "samples / s", "adapter_bytes": "storage bytes",
               score.column: score.label}
    columns |= {"lm_loss": "LM loss"} if "lm_loss" in runs else {}
    labels = {"teacher": "teacher (full fine-tune)", "base": "base (untrained)"}
    labels |= {name: f"{name} (base + rank-{name.removeprefix('teacher_r')} ΔW of the teacher)"
               for name in references.index if str(name).startswith("teacher_r")}
    models = [name for name in labels if name in references.index]
    rows = references.loc[models].reindex(columns=["source", *columns])
    rows.index = [labels[name] for name in models]
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
    low, high = (f"{score.column}_{end}" for end in ("low", "high"))
    if {low, high} <= set(references):  # a sampling interval over the test samples (ROC-AUC: DeLong's)
        interval = references.loc[models, [low, high]].apply(
            lambda row: MISSING if row.isna().any() else f"[{row[low]:.3g}, {row[high]:.3g}]", axis=1)
        interval.index = [labels[name] for name in models]
        compared.insert(compared.columns.get_loc(score.column) + 1, f"{score.column} 95% interval", interval)
    compared = compared.rename(columns={**columns, "source": "scores from",
                                        f"{score.column} 95% interval": f"{score.label} 95% interval"})
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
        arms = curves.loc[objective].reset_index()[list(AXES[1:])].drop_duplicates()
        arms = arms.sort_values("init", key=lambda column: column.map(inits.index), kind="stable")
        drawn = collections.Counter()  # arms of each init already drawn: they differ by line style
        for preset, init, strategy, learning_rate in arms.itertuples(index=False):
            curve = curves.loc[(objective, preset, init, strategy, learning_rate)]
            lr = "" if learning_rate == DEFAULT_LR else f", lr {learning_rate}"
            label = f"{init} ({preset}, {strategy}{lr})" if (arms["init"] == init).sum() > 1 else init
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
    """An HTML table the page's script sorts by a clicked header, the `integers` columns present rounded, missing
    values as a dash."""
    frame = frame.copy()
    for column in (column for column in integers if column in frame):
        frame[column] = frame[column].round().astype("Int64")
    records = frame.astype(object).where(frame.notna(), MISSING).to_dict("records")
    return table(records, list(frame.columns)).replace("<table>", '<table class="sortable">', 1)
