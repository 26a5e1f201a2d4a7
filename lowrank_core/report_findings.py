"""The report's opening sections: the study's findings, computed from the numbers with their confidence, and the
warnings where a comparison measures nothing.

Each finding answers one question of the study in one sentence, says how sure it is and links to its evidence
section; a question whose inputs are absent says so. Each warning names the rows (arm/seedN, or a reference) it is
about. The thresholds are the constants below.
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .grid import AXES, FROZEN_HEAD_OBJECTIVES
from .io import read_json
from .modalities import CLASSIFICATION, Score
from .report import ReportSection
from .report_lora import LORA_INPUTS, SMOOTHING, arm_means, format_interval, read_grid_table
from .stats import (BETTER, CONFIDENCE, UNDETERMINED, WITHIN_NOISE, WORSE, arm_label, axis_comparisons,
                    infer_baseline, init_comparisons, mean_interval, paired_difference)

LOW_RANK_ENERGY = 0.9  # ΔW is low-rank when a rank a flat spectrum would give at most FLAT_SHARE holds this energy
FLAT_SHARE = 0.25
TEACHER_MARGIN = 0.05  # without a sampling interval, the teacher must beat the base's test score by this much
CHANCE_MARGIN = 0.05  # a test score this close to chance is at chance
LABEL_BLIND_FRACTION = 0.9  # an arm at chance, its final loss at this fraction of the label-blind loss: no label
FORMAT_UNLEARNED = 1.5  # ... and above this multiple of it not even the answer format
VAL_RISE = 0.05  # the last validation loss this far (relative) above its minimum, while the training loss fell
COSTS = (("trainable_parameters", "trainable parameters"), ("train_seconds", "train time"),
         ("peak_memory_mb", "peak memory"))
EVAL_METRICS = ("accuracy", "f1", "roc_auc", "average_precision", "lm_loss", "perplexity", "positive_rate", "abs_rel",
                "rmse", "delta1", "test_loss", "exact_match", "numeric_accuracy")
# missing by design: target never reached, bound unknown, an init without preprocessing
MAY_BE_MISSING = ("steps_to_target", "label_blind_loss", "init_peak_memory_mb")


@dataclasses.dataclass
class Finding:
    question: str
    answer: str  # one sentence, plain text
    confidence: str  # plain text; empty when the question cannot be answered
    evidence: str | None = None  # the anchor of the section holding the evidence
    sources: tuple[str, ...] = ()  # the files the numbers come from


@dataclasses.dataclass
class Grid:
    """The LoRA grid's tables and its baseline arm."""
    runs: pd.DataFrame
    references: pd.DataFrame  # indexed by model
    history: pd.DataFrame
    baseline: dict
    score: Score = CLASSIFICATION  # the test metric arms are judged by (the modality's)
    head_score: float | None = None  # the pre-trained detection head's alone, on the same test split

    @classmethod
    def read(cls, inputs: dict[str, str], baseline: dict | None, score: Score = CLASSIFICATION) -> Grid | None:
        """The grid of the report's `inputs` (None without its tables); the baseline inferred when None."""
        if not all(name in inputs for name in LORA_INPUTS):
            return None
        runs = read_grid_table(inputs["lora_table"])
        head = (read_json(inputs["head_metrics"])["test"]["classification"].get(score.column)
                if "head_metrics" in inputs else None)
        return cls(runs, pd.read_csv(inputs["lora_references"]).set_index("model"),
                   read_grid_table(inputs["lora_history"]), baseline or infer_baseline(runs), score, head)


def gain(score: Score, value: float, reference: float) -> float:
    """How much better `value` scores than `reference` (positive: better), whichever direction the score runs."""
    return value - reference if score.higher_is_better else reference - value


def at_chance(score: Score, value: float, low: float = math.nan, high: float = math.nan) -> bool:
    """Whether a test score is within `CHANCE_MARGIN` of the score's chance level, or its interval (`low`, `high`,
    where known) contains it; False for a score without a chance level."""
    chance = score.chance
    return chance is not None and (abs(value - chance) < CHANCE_MARGIN or low <= chance <= high)


def teacher_unlearned(references: pd.DataFrame, score: Score = CLASSIFICATION) -> str | None:
    """Why the full fine-tune did not learn the task ("test roc_auc 0.5 [0.38, 0.62] is at chance (0.5)"), or None
    when it did or its test score is missing: its score at chance (see `at_chance`, with its sampling interval where
    the references hold one), or not better than the base's: by its interval's worse end where it has one, else by
    `TEACHER_MARGIN`."""
    metric = score.column
    teacher, low, high = _reference_values(references, "teacher", metric)
    if pd.isna(teacher):
        return None
    stated = f"test {metric} {_reference_score(references, 'teacher', metric)}"
    if at_chance(score, teacher, low, high):
        return f"{stated} is at chance ({score.chance})"
    base = _reference_values(references, "base", metric)[0]
    if pd.isna(base):
        return None
    worst = low if score.higher_is_better else high
    if pd.isna(worst):
        if gain(score, teacher, base) < TEACHER_MARGIN:
            return f"{stated} is not {TEACHER_MARGIN} better than the base's {base:.3g}"
    elif gain(score, worst, base) <= 0:
        return f"{stated} is not better than the base's {base:.3g} beyond its interval"
    return None


def _unanswerable(reason: str, consequence: str) -> str:
    """The answer of a finding that needs a teacher which did not learn (`reason`, see `teacher_unlearned`)."""
    return f"Cannot be answered: the full fine-tune did not learn the task (its {reason}), so {consequence}."


def findings_section(inputs: dict[str, str], baseline: dict | None = None,
                     score: Score = CLASSIFICATION) -> ReportSection:
    """`<section id="findings">`: the five questions of the study answered from the report's `inputs` (the names of
    `write_report`); `baseline` is the grid's baseline arm, inferred when None; arms are judged by `score`."""
    grid = Grid.read(inputs, baseline, score)
    delta = Path(inputs["delta"]) / "svd_analysis.json" if "delta" in inputs else None
    table = (inputs["lora_table"],) if grid else ()
    comparisons = {key.removeprefix("lowrank_comparison_"): path for key, path in inputs.items()
                   if key.startswith("lowrank_comparison_")}
    findings = [
        dataclasses.replace(delta_finding(read_json(delta) if delta else None), sources=(str(delta),) if delta else ()),
        dataclasses.replace(init_finding(grid), sources=table),
        dataclasses.replace(axes_finding(grid), sources=table),
        dataclasses.replace(fine_tune_finding(grid), sources=(*table, inputs["lora_references"]) if grid else ()),
        dataclasses.replace(lowrank_finding({arch: read_json(path) for arch, path in comparisons.items()}),
                            sources=tuple(comparisons.values())),
    ]
    if grid and "forgetting" in grid.runs:
        findings.append(dataclasses.replace(forgetting_finding(grid), sources=(*table, inputs["lora_references"])))
    intro = (f"<p>Each question answered from the numbers below. Intervals are {CONFIDENCE:.0%} t-intervals over "
             "seeds, differences paired by seed against the grid's baseline arm"
             + (f" <code>{html.escape(arm_label(grid.baseline))}</code>" if grid else "") + ".</p>")
    return ReportSection("Findings", intro + '<ol class="findings">' + "".join(map(_finding_html, findings))
                         + "</ol>", "findings")


def _finding_html(finding: Finding) -> str:
    notes = [f"Confidence: {html.escape(finding.confidence)}."] if finding.confidence else []
    if finding.evidence:
        notes.append(f'<a href="#{finding.evidence}">Evidence</a>'
                     + (" from " + ", ".join(f"<code>{html.escape(s)}</code>" for s in finding.sources)
                        if finding.sources else "") + ".")
    return (f"<li><strong>{html.escape(finding.question)}</strong> {html.escape(finding.answer)}"
            + (f"<br><small>{' '.join(notes)}</small>" if notes else "") + "</li>")


def delta_finding(analysis: dict | None) -> Finding:
    """Is ΔW low-rank, and where most and least? From `svd_analysis.json` (see `delta.write_delta_outputs`)."""
    question = "Is ΔW low-rank, and where most and least?"
    if analysis is None:
        return Finding(question, "Cannot be answered: the ΔW analysis (results/delta) is not among the inputs.", "")
    ranks = analysis["ranks"]
    energy = {r: analysis["groups"]["all"]["energy"][str(r)] for r in ranks}
    changed = [m for m in analysis["modules"] if m["frobenius_norm"] > 0]
    if not changed:
        return Finding(question, "Cannot be answered: the teacher changed none of the analysed modules.", "",
                       "delta")
    flat = {r: _flat_energy(changed, r) for r in ranks}
    low = [r for r in ranks if flat[r] <= FLAT_SHARE and energy[r] >= LOW_RANK_ENERGY]
    r = low[0] if low else max((r for r in ranks if flat[r] <= FLAT_SHARE), default=ranks[0])
    share = f"rank {r} holds {energy[r]:.0%} of ‖ΔW‖² over the {len(changed)} changed modules " \
            f"(a flat spectrum would give {flat[r]:.0%})"
    if low:
        verdict = f"Yes: {share}"
    elif energy[r] >= 2 * flat[r]:
        verdict = f"Partly: {share}, concentrated but under {LOW_RANK_ENERGY:.0%}"
    else:
        verdict = f"No: {share}"
    key = str(ranks[0])
    groups = {name: group["energy"][key] for grouping in ("by_tower_kind", "by_layer")
              for name, group in analysis["groups"][grouping].items() if group["energy"][key] is not None}
    most, least = max(groups, key=groups.get), min(groups, key=groups.get)
    where = (f"; at rank {key} the most low-rank group is {most} ({groups[most]:.0%}), the least {least} "
             f"({groups[least]:.0%})")
    approximate = sum(m["method"] != "exact" for m in changed)
    worst = analysis.get("factor_rel_error_max")
    checked = f", factors within {worst:.1g} of the exact ΔW_r" if worst is not None else ""
    confidence = ("exact SVD of every changed module" if not approximate else
                  f"exact SVD of {len(changed) - approximate} and a Gram-matrix SVD of {approximate} of the "
                  f"{len(changed)} changed modules") + checked + ", of one teacher"
    return Finding(question, verdict + where + ".", confidence, "delta")


def _flat_energy(modules: list[dict], rank: int) -> float:
    """The pooled energy at `rank` if every module's ΔW had a flat spectrum (rank / full rank of each)."""
    total = sum(m["frobenius_norm"] ** 2 for m in modules)
    return sum(min(rank, min(m["shape"])) / min(m["shape"]) * m["frobenius_norm"] ** 2 for m in modules) / total


def init_finding(grid: Grid | None) -> Finding:
    """Does SVD init reach the target loss sooner and end closer to the teacher than every other init in the grid?
    Compared at the baseline's objective and preset, under each strategy both inits ran with (a product grid has
    several: where the adapters go can decide whether the teacher's ΔW helps)."""
    question = "Does SVD init converge faster and end closer to the teacher than the other inits?"
    if grid is None:
        return Finding(question, "Cannot be answered: there is no LoRA grid.", "")
    inits = list(dict.fromkeys(grid.runs["init"]))
    if "svd" not in inits:
        return Finding(question, f"Cannot be answered: svd is not in the grid (inits: {', '.join(inits)}).", "",
                       "effects")
    if unlearned := teacher_unlearned(grid.references, grid.score):
        return Finding(question, _unanswerable(unlearned, "svd init starts from a ΔW that holds nothing of the task "
                                               "and closeness to the teacher means nothing"), "", "warnings")
    clauses, seeds = [], set()
    strategies = [grid.baseline["strategy"]] + [s for s in dict.fromkeys(grid.runs["strategy"])
                                                if s != grid.baseline["strategy"]]
    for other in (init for init in inits if init != "svd"):
        for strategy in strategies:
            rows = init_comparisons(grid.runs, {**grid.baseline, "strategy": strategy}, reference=other)
            rows = rows[rows["value"] == "svd"].set_index("metric")
            if rows.empty:
                continue
            seeds |= set(rows["n"])
            both = pd.concat([_arm_runs(grid.runs, arm_label({**grid.baseline, "strategy": strategy, "init": init}))
                              for init in ("svd", other)])
            if both["steps_to_target"].isna().all():  # both censored at max_steps: a meaningless "+0 [+0, +0]"
                within = f" in {_counts(both['max_steps'])} steps" if "max_steps" in both else ""
                steps = f"reaches the target loss neither sooner nor later (neither it nor {other} reaches it{within})"
            else:
                steps = _init_phrase(rows.loc["steps_to_target"], "reaches the target loss", "sooner", "later", "steps")
            clauses.append((f"vs {other}" if strategy == grid.baseline["strategy"] else f"vs {other} at {strategy}")
                           + ": " + steps
                           + " and " + _init_phrase(rows.loc["delta_distance"], "ends", "closer to the teacher",
                                                    "farther from the teacher", "distance"))
    if not clauses:
        return Finding(question, "Cannot be answered: no svd arm shares the baseline's objective, preset and "
                       f"strategy ({arm_label(grid.baseline)}).", "", "effects")
    confidence = (f"{CONFIDENCE:.0%} paired t-intervals of svd − other over {_counts(seeds)} seed(s); a run that never "
                  "reached the target loss counts as its max_steps, which understates a difference")
    return Finding(question, "SVD init " + "; ".join(clauses) + ".", confidence, "convergence")


def _init_phrase(row: pd.Series, doing: str, better: str, worse: str, measure: str) -> str:
    """E.g. "reaches the target loss sooner (Δ steps -12 [-20, -4])", or "... neither sooner nor later beyond noise"
    (each clause states its own verdict, so two can be joined by "and")."""
    delta = f"Δ {measure} {format_interval(row['mean'], row['ci_low'], row['ci_high'])}"
    if row["verdict"] in (BETTER, WORSE):
        return f"{doing} {better if row['verdict'] == BETTER else worse} ({delta})"
    if row["verdict"] == WITHIN_NOISE:
        return f"{doing} neither {better} nor {worse} beyond noise ({delta})"
    return f"{doing} {better} or {worse}: cannot tell with fewer than two paired seeds ({delta})"


def axes_finding(grid: Grid | None) -> Finding:
    """Which preset, strategy and objective score best on the test metric, and at what cost, against the baseline?"""
    metric = grid.score.column if grid else CLASSIFICATION.column
    axes = ["preset", "strategy", "objective"]
    if grid is not None and grid.runs["learning_rate"].nunique() > 1:
        axes.append("learning_rate")
    names = [axis.replace("_", " ") for axis in axes]
    question = f"Which {', '.join(names[:-1])} and {names[-1]} score best (test {metric}), at what cost?"
    if grid is None or metric not in grid.runs or grid.runs[metric].isna().all():
        return Finding(question, f"Cannot be answered: no LoRA runs with a test {metric}.", "")
    means = arm_means(grid.runs, (metric, *(cost for cost, _ in COSTS if cost in grid.runs)))
    if all(at_chance(grid.score, value) for value in means[f"{metric} mean"].dropna()):
        return Finding(question, f"Cannot be answered: every arm's mean test {metric} is within {CHANCE_MARGIN} of "
                       f"chance ({grid.score.chance}), so no axis can be judged.", "", "warnings")
    clauses, seeds = [], set()
    for axis in axes:
        compared = axis_comparisons(grid.runs, grid.baseline, metric, grid.score.higher_is_better, axes=(axis,))
        seeds |= set(compared["n"])
        clauses.append(_axis_clause(axis, grid.baseline[axis], compared, means, arm_label(grid.baseline),
                                    grid.score))
    confidence = (f"{CONFIDENCE:.0%} paired t-intervals of value − baseline over {_counts(seeds)} seed(s); a winner "
                  "is claimed only when its interval excludes 0" if seeds else "")
    return Finding(question, "; ".join(clauses) + ".", confidence, "effects")


def _axis_clause(axis: str, reference: str, compared: pd.DataFrame, means: pd.DataFrame, baseline: str,
                 score: Score = CLASSIFICATION) -> str:
    """One axis's part of `axes_finding`."""
    if compared.empty:
        return f"{axis}: only {reference} in the grid"
    better, worse = compared[compared["verdict"] == BETTER], compared[compared["verdict"] == WORSE]
    if not better.empty:
        best = better.loc[(better["mean"] if score.higher_is_better else -better["mean"]).idxmax()]
        ratios = [f"{means.at[best['arm'], f'{cost} mean'] / means.at[baseline, f'{cost} mean']:.2g}× the {label}"
                  for cost, label in COSTS if f"{cost} mean" in means and means.at[baseline, f"{cost} mean"] > 0
                  and pd.notna(means.at[best["arm"], f"{cost} mean"])]
        return (f"{axis}: {best['value']} scores best ({best['value_mean']:.3g} vs {best['reference_mean']:.3g} for "
                f"{reference}, Δ {format_interval(best['mean'], best['ci_low'], best['ci_high'])})"
                + (f" at {', '.join(ratios)} of {reference}" if ratios else ""))
    if len(worse) == len(compared):
        return f"{axis}: the baseline {reference} scores best, every other value worse beyond noise"
    lower = f" ({', '.join(worse['value'])} worse beyond noise)" if not worse.empty else ""
    return f"{axis}: no value scores better than the baseline {reference} beyond noise{lower}"


def fine_tune_finding(grid: Grid | None) -> Finding:
    """How far is the best LoRA arm from the full fine-tune, and how much of the fine-tune's gain over the base do
    the teacher's rank-r ΔW references hold?"""
    question = "How far is the best LoRA arm from the full fine-tune, and how much of its gain does ΔW_r hold?"
    references = grid.references if grid else None
    metric = grid.score.column if grid else CLASSIFICATION.column
    if grid is None or "teacher" not in references.index or pd.isna(references.get(metric, {}).get("teacher")):
        return Finding(question, f"Cannot be answered: no teacher test {metric} among the references.", "")
    if unlearned := teacher_unlearned(references, grid.score):
        return Finding(question, _unanswerable(unlearned, "neither an arm's distance from it nor the ΔW_r "
                                               "references' share of its gain means anything"), "", "warnings")
    teacher = references.at["teacher", metric]
    scores = arm_means(grid.runs, (metric,))[f"{metric} mean"].dropna()
    if scores.empty:
        return Finding(question, f"Cannot be answered: no LoRA run has a test {metric}.", "", "lora-comparison")
    best = scores.idxmax() if grid.score.higher_is_better else scores.idxmin()
    score = mean_interval(_arm_runs(grid.runs, best)[metric])
    gap = {key: teacher - score[other] for key, other in (("mean", "mean"), ("ci_low", "ci_high"),
                                                          ("ci_high", "ci_low"))}
    if gap["ci_low"] <= 0 <= gap["ci_high"]:
        distance = "matches the full fine-tune within noise"
    else:
        distance = f"is {format_interval(gap['mean'], gap['ci_low'], gap['ci_high'])} from it (teacher − arm)"
    reached = format_interval(score["mean"], score["ci_low"], score["ci_high"], ".3g")
    answer = (f"The best LoRA arm {best} reaches test {metric} {reached} against the full fine-tune's "
              f"{_reference_score(references, 'teacher', metric)} and {distance}; "
              + _rank_shares(references, teacher, grid.score))
    spread = _seed_spread(score["n"], "the arm's ")
    sampling = (f" (the teacher's interval: {CONFIDENCE:.0%} DeLong over the test samples)"
                if f"{metric}_low" in references else "")
    return Finding(question, answer + ".", f"{spread}; the teacher, base and ΔW_r references are single evaluations"
                   + sampling, "lora-comparison")


def _reference_values(references: pd.DataFrame, name: str, metric: str) -> tuple[float, float, float]:
    """A reference's test score and its sampling interval's ends (`<metric>_low` / `_high`), NaN where missing."""
    return tuple(references.get(column, {}).get(name, math.nan)
                 for column in (metric, f"{metric}_low", f"{metric}_high"))


def _reference_score(references: pd.DataFrame, name: str, metric: str) -> str:
    """A reference's test score, with its sampling interval where the tables hold one."""
    return format_interval(*_reference_values(references, name, metric), ".3g")


def forgetting_finding(grid: Grid) -> Finding:
    """What the fine-tunes cost in general ability: the teacher's and the arms' loss on the general text over the
    base's (`forgetting`), the least-forgetting arm with its interval."""
    question = "What does fine-tuning cost in general ability (loss on the general text over the base's)?"
    forgetting = arm_means(grid.runs, ("forgetting",))["forgetting mean"].dropna()
    if forgetting.empty:
        return Finding(question, "Cannot be answered: no arm has a general-text loss.", "")
    least = forgetting.idxmin()
    interval = mean_interval(_arm_runs(grid.runs, least)["forgetting"])
    teacher = grid.references["forgetting"].get("teacher", float("nan"))
    answer = (f"The full fine-tune's loss on the general text is {teacher:+.3g} over the base's; the LoRA arms' "
              f"{forgetting.mean():+.3g} on average ({forgetting.min():+.3g} to {forgetting.max():+.3g}), least for "
              f"{least} ({format_interval(interval['mean'], interval['ci_low'], interval['ci_high'], '+.3g')})")
    spread = _seed_spread(interval["n"])
    return Finding(question, answer + ".", f"{spread}; the teacher and base are single evaluations", "lora")


def _arm_runs(runs: pd.DataFrame, label: str) -> pd.DataFrame:
    """The runs (one per seed) of the arm labelled `label`."""
    return runs[[arm_label(arm) == label for arm in runs[list(AXES)].to_dict("records")]]


def _seed_spread(seeds: int, whose: str = "") -> str:
    return f"{whose}{CONFIDENCE:.0%} t-interval over {seeds} seeds" if seeds > 1 else "one seed, no interval"


def _rank_shares(references: pd.DataFrame, teacher: float, score: Score = CLASSIFICATION) -> str:
    """The share of the teacher's gain over the base each `teacher_r{r}` reference holds, as a clause; the teacher
    learned the task (see `teacher_unlearned`)."""
    ranked = references[references.index.str.startswith("teacher_r")]
    metric = score.column
    if ranked.empty:
        return "there are no ΔW_r references"
    if "base" not in references.index or pd.isna(references.at["base", metric]):
        return "without a base score the ΔW_r references' share of the gain is unknown"
    base = references.at["base", metric]
    order = ranked["rank"] if "rank" in ranked else ranked.index.str.removeprefix("teacher_r").astype(int)
    shares = [f"{(row[metric] - base) / (teacher - base):.0%} at r={int(rank)}"
              for rank, (_, row) in sorted(zip(order, ranked.iterrows()), key=lambda item: item[0])]
    return f"the ΔW_r references hold {', '.join(shares)} of its gain over the base ({base:.3g} → {teacher:.3g})"


def lowrank_finding(comparisons: dict[str, dict]) -> Finding:
    """How close do the low-rank nets get to the per-sample truncated SVD? From each arch's `comparison.json`."""
    question = "How close do the low-rank nets get to the per-sample SVD?"
    if not comparisons:
        return Finding(question, "Cannot be answered: no low-rank nets were trained (they decompose a "
                       "vision-language model's features: not part of a text or depth study; or no lowrank archs).", "")
    ranked = sorted(comparisons.items(), key=lambda item: item[1]["ratio"]["mse"] or math.inf)
    parts = [f"{arch} reaches {c['ratio']['mse']:.3g}× the SVD's MSE at rank {c['effective_rank']} (energy "
             f"{c['network']['energy_captured']:.3g} vs {c['svd']['energy_captured']:.3g}) in "
             f"{c['ratio']['seconds_per_sample']:.3g}× its time per sample" for arch, c in ranked
             if c["ratio"]["mse"] is not None and c["ratio"]["seconds_per_sample"] is not None]
    if not parts:
        return Finding(question, "Cannot be answered: the SVD's error is 0, so no ratio exists.", "", "lowrank")
    samples = sorted({c["n_samples"] for c in comparisons.values()})
    return Finding(question, f"Closest first: {'; '.join(parts)}.",
                   f"one evaluation on {_counts(samples)} test samples (no interval); the SVD is the optimum at its "
                   "rank, so 1× is the best a net can do", "lowrank")


def _counts(values) -> str:
    """Distinct counts as "3" or "2–3"."""
    values = sorted(int(v) for v in values)
    if not values:
        return "0"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def warnings_section(inputs: dict[str, str], baseline: dict | None = None,
                     score: Score = CLASSIFICATION) -> ReportSection:
    """`<section id="warnings">`: every computed warning (see `grid_warnings`), or "No warnings"."""
    grid = Grid.read(inputs, baseline, score)
    teacher_history = Path(inputs["teacher"]) / "history.csv" if "teacher" in inputs else None
    teacher = pd.read_csv(teacher_history) if teacher_history and teacher_history.exists() else None
    found = grid_warnings(grid, teacher) if grid else history_warnings({"teacher": teacher} if teacher is not None
                                                                       else {})
    body = ("<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in found) + "</ul>" if found
            else "<p>No warnings.</p>")
    chance = (f"arms and ΔW_r references at chance (|mean {score.column} − {score.chance}| &lt; {CHANCE_MARGIN}, or "
              "a reference's interval containing it), arms or references "
              "below it (an inverted signal) or giving one answer to every test sample, an untrained base above it "
              f"beyond its {CONFIDENCE:.0%} interval over the test samples, "
              if score.chance is not None else "")
    intro = ("<p>Computed checks for comparisons that measure nothing: a teacher that did not learn (at chance, or "
             f"on test {score.column} not better than the base beyond its interval, or without one by "
             f"{TEACHER_MARGIN}), {chance}arms at chance with final losses at ≥ "
             f"{LABEL_BLIND_FRACTION:.0%} of the label-blind loss, frozen-head arms not above their pre-trained head "
             "alone beyond noise, axes without a difference beyond noise, validation "
             f"losses rising ≥ {VAL_RISE:.0%} above their minimum and beyond noise over the validation batches while "
             "the training loss fell, and missing or non-finite numbers (NaN guard).</p>")
    return ReportSection("Warnings", intro + body, "warnings")


def grid_warnings(grid: Grid, teacher_history: pd.DataFrame | None = None) -> list[str]:
    """Every warning about the grid's tables and the teacher's training history."""
    histories = {name: run for name, run in grid.history.groupby("arm", sort=False)}
    if teacher_history is not None:
        histories["teacher"] = teacher_history
    return (teacher_warnings(grid.references, grid.score) + chance_warnings(grid.runs, grid.references, grid.score)
            + label_blind_warnings(grid.runs, grid.score) + frozen_head_warnings(grid.runs, grid.head_score, grid.score)
            + noise_warnings(grid.runs, grid.baseline, grid.score)
            + nan_warnings(grid.runs, grid.references) + history_warnings(histories))


def teacher_warnings(references: pd.DataFrame, score: Score = CLASSIFICATION) -> list[str]:
    """The teacher that did not learn the task (see `teacher_unlearned`)."""
    unlearned = teacher_unlearned(references, score)
    return [f"teacher: {unlearned}: the full fine-tune did not learn the task, so comparisons with it measure "
            "nothing."] if unlearned else []


def chance_warnings(runs: pd.DataFrame, references: pd.DataFrame, score: Score = CLASSIFICATION) -> list[str]:
    """Arms whose mean test metric is at chance, ΔW_r references at chance (see `at_chance`), arms and references
    below it (an inverted signal; a reference with a sampling interval only when the interval lies below chance), the
    base above it beyond its sampling interval (not blind to the task), and arms (their seeds named) or references
    other than the base predicting one class for every sample; none for a score without a chance level."""
    found, metric, chance = [], score.column, score.chance
    if chance is None or metric not in runs:
        return found
    for arm, value in arm_means(runs, (metric,))[f"{metric} mean"].items():
        if at_chance(score, value):
            found.append(f"{arm}: mean test {metric} {value:.3g} is at chance (within {CHANCE_MARGIN} of {chance}).")
        elif value <= chance - CHANCE_MARGIN:
            found.append(_inverted(arm, f"mean test {metric} {value:.3g}"))
    if metric in references:
        found += [f"{name}: test {metric} {_reference_score(references, name, metric)} is at chance ({chance})."
                  for name in references.index[references.index.str.startswith("teacher_r")]
                  if at_chance(score, *_reference_values(references, name, metric))]
        high = references.get(f"{metric}_high", pd.Series(dtype=float))
        found += [_inverted(name, f"test {metric} {_reference_score(references, name, metric)}")
                  for name, value in references[metric].items()
                  if value <= chance - CHANCE_MARGIN and not high.get(name, math.nan) >= chance]
        if "base" in references.index and references.get(f"{metric}_low", {}).get("base", chance) > chance:
            found.append(f"base: test {metric} {_reference_score(references, 'base', metric)} is above chance beyond "
                         "the test split's sampling noise: the untrained base already reads part of the signal, so "
                         "a gain over the base understates what a fine-tune learned.")
    if "positive_rate" in runs:
        for arm, seeds in _seeds_per_arm(runs[runs["positive_rate"].isin((0, 1))]):
            answers = ", ".join(f"{seed} {'positive' if rate else 'negative'}"
                                for seed, rate in zip(seeds["seed"], seeds["positive_rate"]))
            found.append(f"{arm}: predicts one class for every test sample (seed {answers}).")
    if "positive_rate" in references:  # not the base's: blind, it may well give one answer
        for name, rate in references["positive_rate"].drop("base", errors="ignore").items():
            if rate in (0, 1):
                found.append(f"{name}: predicts {'positive' if rate else 'negative'} for every test sample.")
    return found


def _inverted(name: str, score: str) -> str:
    return (f"{name}: {score} is below chance: it ranks tampered samples below real ones, a signal of the wrong sign "
            "rather than none; a higher score than another's does not mean it learned more.")


def label_blind_warnings(runs: pd.DataFrame, score: Score = CLASSIFICATION) -> list[str]:
    """Arms (their seeds named) whose final training loss stayed at the label-blind bound while their mean test score
    is at chance (see `at_chance`): the answer format learned, not the label; or far above the bound: not even the
    format. An arm above chance at the bound ranks by the label without being confident of it: no warning."""
    if "label_blind_loss" not in runs:
        return []
    metric = score.column
    means = arm_means(runs, (metric,))[f"{metric} mean"] if metric in runs else pd.Series(dtype=float)
    blind = {arm for arm, value in means.items() if at_chance(score, value)}
    chance = _arm_labels(runs).isin(blind)
    ratio = runs["final_loss"] / runs["label_blind_loss"]
    found = []
    for stuck, verdict in ((ratio.between(LABEL_BLIND_FRACTION, FORMAT_UNLEARNED) & chance,
                            "it learned the answer format, not the label"),
                           (ratio > FORMAT_UNLEARNED, "it has not even learned the answer format")):
        for arm, seeds in _seeds_per_arm(runs[stuck].assign(ratio=ratio[stuck])):
            times = ", ".join(f"{value:.3g}×" for value in seeds["ratio"])
            found.append(f"{arm}: final training loss {times} the label-blind bound "
                         f"{seeds['label_blind_loss'].iloc[0]:.3g} (seed {', '.join(map(str, seeds['seed']))}): "
                         f"{verdict}.")
    return found


def frozen_head_warnings(runs: pd.DataFrame, head_score: float | None, score: Score = CLASSIFICATION) -> list[str]:
    """Frozen-head arms (the pre-trained detection head kept as it is, adapters trained under it) whose mean test
    score is not better than the head's alone beyond noise: the 95% t-interval over their seeds (with one seed, the
    score) does not lie above it. Such an arm scores what its head does: its adapters added nothing measurable."""
    metric = score.column
    if head_score is None or math.isnan(head_score) or metric not in runs:
        return []
    found = []
    for arm, seeds in _seeds_per_arm(runs[runs["objective"].isin(FROZEN_HEAD_OBJECTIVES)]):
        interval = mean_interval(seeds[metric])
        worst = interval["ci_low" if score.higher_is_better else "ci_high"]
        worst = interval["mean"] if math.isnan(worst) else worst
        if gain(score, worst, head_score) <= 0:
            mean = format_interval(interval["mean"], interval["ci_low"], interval["ci_high"], ".3g")
            found.append(f"{arm}: mean test {metric} {mean} over {interval['n']} seed(s) is not above the pre-trained "
                         f"head's alone ({head_score:.3g}) beyond noise: its adapters added nothing measurable to "
                         "the frozen head.")
    return found


def noise_warnings(runs: pd.DataFrame, baseline: dict, score: Score = CLASSIFICATION) -> list[str]:
    """Axes none of whose values differs from the baseline beyond noise on the test metric."""
    found, metric = [], score.column
    for axis in AXES:
        compared = axis_comparisons(runs, baseline, metric, score.higher_is_better, axes=(axis,))
        if not compared.empty and compared["verdict"].isin((WITHIN_NOISE, UNDETERMINED)).all():
            values = ", ".join(f"{value} ({verdict})" for value, verdict in zip(compared["value"], compared["verdict"]))
            found.append(f"{axis}: no value differs from the baseline {baseline[axis]} beyond noise on test {metric} "
                         f"({values}); this axis measured nothing at {_counts(compared['n'])} seed(s).")
    return found


def nan_warnings(runs: pd.DataFrame, references: pd.DataFrame) -> list[str]:
    """NaN guard on the tables: non-finite numbers, and a run's metric missing where other runs of its objective
    (or other references) have it; `MAY_BE_MISSING` columns may be missing."""
    found = []
    numeric = [c for c in runs.select_dtypes("number") if c != "seed" and c not in MAY_BE_MISSING]
    for name, missing in zip(_run_names(runs), _missing(runs, numeric, runs["objective"]).to_numpy()):
        if missing:
            found.append(f"NaN guard: {name} has no finite {', '.join(missing)} while other runs of its objective "
                         "do.")
    columns = [c for c in EVAL_METRICS if c in references]
    for name, missing in _missing(references, columns, pd.Series("all", index=references.index)).items():
        if missing:
            found.append(f"NaN guard: reference {name} has no finite {', '.join(missing)} while other references do.")
    return found


def _missing(frame: pd.DataFrame, columns: list[str], groups: pd.Series) -> pd.Series:
    """Per row, the `columns` that are non-finite there, or missing while another row of its group has them."""
    values = frame[columns].astype(float)
    infinite = np.isinf(values)
    known = values.notna().groupby(groups).transform("any")
    flagged = infinite | (values.isna() & known)
    return flagged.apply(lambda row: [c for c in columns if row[c]], axis=1)


def history_warnings(histories: dict[str, pd.DataFrame]) -> list[str]:
    """Per training history: non-finite or missing training losses (NaN guard), and the validation loss rising by the
    end above its minimum while the (smoothed) training loss fell: by at least `VAL_RISE` (relative) and, where the
    history has the validation batches' losses, beyond noise (the last evaluation against the best, paired by batch:
    the 95% interval of the mean rise excludes 0)."""
    found = []
    for name, run in histories.items():
        run = run.sort_values("step")
        bad = run[~np.isfinite(run["loss"].astype(float)) | np.isinf(run["val_loss"].astype(float))]
        if not bad.empty:
            found.append(f"NaN guard: {name} has a missing or non-finite loss at {len(bad)} step(s), first at step "
                         f"{bad['step'].iloc[0]}.")
        val = run.dropna(subset=["val_loss"])
        if len(val) < 2:
            continue
        best, last = val.loc[val["val_loss"].idxmin()], val.iloc[-1]
        train = run.set_index("step")["loss"].rolling(SMOOTHING, min_periods=1).mean()
        if not (last["val_loss"] > best["val_loss"] * (1 + VAL_RISE) and train[last["step"]] < train[best["step"]]):
            continue
        rise = _val_rise(best, last)
        if rise is None or rise["verdict"] == WORSE:
            noise = (f", by {format_interval(rise['mean'], rise['ci_low'], rise['ci_high'])} per validation batch "
                     f"(paired over {rise['n']} batches)" if rise else "")
            found.append(f"{name}: validation loss rose from {best['val_loss']:.3g} (step {best['step']:.0f}) to "
                         f"{last['val_loss']:.3g} (step {last['step']:.0f}){noise} while the training loss fell "
                         f"from {train[best['step']]:.3g} to {train[last['step']]:.3g}: overfitting.")
    return found


def _val_rise(best: pd.Series, last: pd.Series) -> dict | None:
    """The last evaluation's validation batch losses against the best one's (`paired_difference`, lower is better),
    or None where the history does not have them."""
    recorded = [row.get("val_batch_losses") for row in (last, best)]
    if not all(isinstance(losses, str) for losses in recorded):
        return None
    last_losses, best_losses = ([float(x) for x in losses.split()] for losses in recorded)
    if len(last_losses) < 2 or len(last_losses) != len(best_losses):
        return None
    return paired_difference(last_losses, best_losses, higher_is_better=False)


def _arm_labels(runs: pd.DataFrame) -> pd.Series:
    """objective/preset/init/strategy of each run."""
    return pd.Series([arm_label(row) for row in runs[list(AXES)].to_dict("records")], index=runs.index, dtype=str)


def _seeds_per_arm(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(objective/preset/init/strategy, its runs) for each arm with runs in `runs`, in table order."""
    labels = _arm_labels(runs)
    return [(arm, runs.loc[labels == arm]) for arm in labels.unique()]


def _run_names(runs: pd.DataFrame) -> pd.Series:
    """objective/preset/init/strategy/seedN of each run."""
    return pd.Series([f"{arm_label(row)}/seed{row['seed']}" for row in runs[[*AXES, "seed"]].to_dict("records")],
                     index=runs.index)
