"""The ablation report: one self-contained HTML page (inline CSS, embedded PNGs) rendered from the stages' JSON.

Each stage contributes a `ReportSection` built from its JSON outputs; `render_report` puts the sections and the
provenance into one page. The page opens with the study's findings and the warnings (`report_findings`), then the
evidence sections the findings link to; the provenance (config hash, commit, versions, platform) closes it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import importlib.metadata
import io
import platform
import re
import subprocess
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import SPLITS, load_image, load_mask  # noqa: E402
from .io import atomic_path  # noqa: E402

PACKAGES = ("lowrank_core", "torch", "transformers", "peft", "accelerate", "safetensors", "snakemake",
            "scikit-learn", "pandas", "numpy", "matplotlib", "pillow")


@dataclasses.dataclass
class ReportSection:
    title: str
    html: str
    anchor: str  # the id of the page's <section>, the target of links to it


def provenance(config_hash: str, source_dir: str | Path) -> dict:
    """Config hash, package versions, git commit of the workflow's source, and the platform."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown (not a git checkout)", False
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "config_hash": config_hash,
        "git_commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu(),
        "rendered_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu() -> str:
    """The CPU's model and the vector instructions torch's kernels use: on CPU, results can differ in their last digits
    between kernels, and training amplifies that."""
    import torch

    models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) \
        if Path("/proc/cpuinfo").exists() else []
    return f"{models[0] if models else platform.processor() or 'unknown'}, {torch.backends.cpu.get_cpu_capability()}"


def render_report(out_html: str | Path, prov: dict, sections: list[ReportSection]) -> None:
    """Write the whole report page atomically."""
    page = _TEMPLATE.render(prov=prov, sections=sections)
    with atomic_path(out_html) as tmp:
        tmp.write_text(page)


def table(rows: list[dict], columns: list[str] | None = None, float_format: str = "{:.4g}") -> str:
    """An HTML table from a list of dicts (numbers formatted, everything escaped)."""
    columns = columns or (list(rows[0]) if rows else [])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c), float_format)}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value, float_format: str) -> str:
    if isinstance(value, float):
        return float_format.format(value)
    return html.escape("" if value is None else str(value))


def figure_html(fig: plt.Figure, alt: str) -> str:
    """Embed a matplotlib figure as a PNG data URI and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def png_html(path: str | Path, alt: str) -> str:
    """Embed a PNG file written by a stage."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def dataset_section(manifest: dict, examples: int = 4) -> ReportSection:
    """Counts per split, warnings, and a few real / tampered examples (images with their masks, or texts)."""
    rows = [{"split": split, **{k: manifest["splits"][split][k] for k in ("count", "real", "tampered", "with_mask")}}
            for split in SPLITS]
    records = manifest["splits"]["train"]["records"]
    warnings = manifest.get("warnings", [])
    warning_html = (f"<p>{len(warnings)} warning(s):</p><ul>"
                    + "".join(f"<li>{html.escape(w)}</li>" for w in warnings[:20]) + "</ul>") if warnings else ""
    if "text" in records[0]:
        chosen = ([r for r in records if r["label"] == 0][: examples // 2]
                  + [r for r in records if r["label"] == 1][: examples - examples // 2])
        shown = table([{"label": "tampered" if r["label"] else "real",
                        "text": r["text"] if len(r["text"]) <= 200 else r["text"][:197] + "..."} for r in chosen])
    else:
        shown = _image_examples(records, examples)
    body = (f"<p>Source: <code>{html.escape(manifest['source'])}</code></p>" + table(rows) + warning_html + shown)
    return ReportSection("Dataset", body, "dataset")


def _image_examples(records: list[dict], examples: int) -> str:
    """A figure of real and tampered training images with their masks."""
    chosen = ([r for r in records if r["label"] == 0][: examples // 2]
              + [r for r in records if r["label"] == 1 and r["mask_path"]][: examples - examples // 2])
    fig, axes = plt.subplots(2, len(chosen), figsize=(2.2 * len(chosen), 4.4), squeeze=False)
    for column, record in enumerate(chosen):
        size = max(record["height"], record["width"])
        axes[0, column].imshow(load_image(record["image_path"], size))
        axes[0, column].set_title("tampered" if record["label"] else "real", fontsize=9)
        axes[1, column].imshow(load_mask(record["mask_path"], size), cmap="gray", vmin=0, vmax=1)
        axes[1, column].set_title("mask", fontsize=9)
    for axis in axes.flat:
        axis.axis("off")
    return figure_html(fig, "dataset examples")


def features_section(stats: dict[str, dict]) -> ReportSection:
    """Feature shapes and statistics per split, and the spectrum of the token features."""
    keys = ("images", "tokens_per_image", "channels", "grid_h", "grid_w", "mean", "std", "token_norm_mean",
            "rank_90", "rank_99", "effective_rank")
    rows = [{"split": split, **{k: stats[split][k] for k in keys}} for split in SPLITS if split in stats]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for split in rows:
        s = stats[split["split"]]
        left.semilogy(np.arange(1, len(s["spectrum"]) + 1), s["spectrum"], label=split["split"])
        right.plot(np.arange(1, len(s["per_image_energy_cumulative"]) + 1), s["per_image_energy_cumulative"],
                   label=f"{split['split']} per image")
        right.plot(np.arange(1, len(s["energy_cumulative"]) + 1), s["energy_cumulative"], "--",
                   label=f"{split['split']} all tokens")
    left.set(title="singular values of centred token features", xlabel="index", ylabel="σ")
    right.set(title="energy captured vs rank", xlabel="rank", ylabel="cumulative energy", ylim=(0, 1.01))
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    intro = ("<p>Vision tokens after the patch merger, cached per split. <em>rank_90 / rank_99</em>: components of "
             "the centred token cloud holding 90% / 99% of its energy; <em>effective_rank</em>: exp of the spectral "
             "entropy.</p>")
    return ReportSection("Vision features", intro + table(rows) + figure_html(fig, "feature spectrum"), "features")


_TEMPLATE = jinja2.Environment(autoescape=False).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Low-rank / LoRA ablation report</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
code{background:#f5f5f5;padding:0 .2em}details{margin:.5em 0}nav a{margin-right:1em}
h3{font-size:1.1em;margin-top:1.4em}summary{cursor:pointer}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
</style></head><body>
<h1>Low-rank / LoRA ablation report</h1>
<nav>{% for s in sections %}<a href="#{{ s.anchor }}">{{ s.title }}</a>{% endfor %}
<a href="#provenance">Provenance</a></nav>
{% for s in sections %}<section id="{{ s.anchor }}"><h2>{{ s.title }}</h2>
{{ s.html }}
</section>
{% endfor %}
<h2 id="provenance">Provenance</h2>
<table><tbody>
<tr><th>config hash</th><td><code>{{ prov.config_hash }}</code></td></tr>
<tr><th>git commit</th><td><code>{{ prov.git_commit }}</code></td></tr>
<tr><th>python / platform</th><td>{{ prov.python }} / {{ prov.platform }}</td></tr>
<tr><th>CPU (of the report job)</th><td>{{ prov.cpu }}</td></tr>
<tr><th>rendered</th><td>{{ prov.rendered_at }}</td></tr>
</tbody></table>
<details><summary>package versions</summary><table><tbody>
{% for name, version in prov.versions.items() %}<tr><th>{{ name }}</th><td>{{ version }}</td></tr>{% endfor %}
</tbody></table></details>
</body></html>
""")


def write_report(out_html: str | Path, inputs: dict[str, str], config_hash: str, source_dir: str | Path,
                 baseline: dict | None = None, modality: str = "vision_language") -> None:
    """Render the report from the named stage outputs present in `inputs`: the findings and warnings, then the
    evidence sections, each only when its inputs are present (see `report_sections.stage_sections` for the names
    after the features), then the modality's own sections. `baseline` is the grid's baseline arm (objective,
    preset, init, strategy), inferred from the grid's table when None (`stats.infer_baseline`); arms are judged by
    the modality's score."""
    from .io import read_json
    from .modalities import INFO, get_modality
    from .report_findings import findings_section, warnings_section  # imported here: they build on this module
    from .report_sections import stage_sections

    score, kind = INFO[modality].score, get_modality(modality)
    sections = [findings_section(inputs, baseline, score), warnings_section(inputs, baseline, score),
                kind.dataset_section(read_json(inputs["manifest"]))]
    stats = {split: read_json(inputs[f"stats_{split}"]) for split in SPLITS if f"stats_{split}" in inputs}
    if stats:
        sections.append(features_section(stats))
    sections += stage_sections(inputs, baseline, score) + kind.result_sections(inputs)
    render_report(out_html, provenance(config_hash, source_dir), sections)
