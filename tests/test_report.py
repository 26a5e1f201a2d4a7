"""The HTML report: the findings and warnings first, every stage's section with its tables and figures, sections
left out without their inputs, and a self-contained page. The stage outputs are written by the stages' own library
functions on tiny inputs."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import time

import pytest
import torch

from lowrank_core.data import DatasetConfig, SyntheticSpec, generate_synthetic, prepare_dataset
from lowrank_core.delta import DeltaConfig, analyse_deltas, write_delta_outputs
from lowrank_core.features import feature_statistics
from lowrank_core.head import HeadConfig, pretrain_head
from lowrank_core.io import read_json, save_tensors, write_json
from lowrank_core.lowrank import compare_with_svd, train_projection
from lowrank_core.report import write_report
from lowrank_core.training import write_history
from test_report_lora import ARMS as GRID_ARMS
from test_report_lora import write_grid

torch.set_num_threads(1)

GRID, WIDTH, RANK = 4, 12, 4
ARCHS = ("ResMLP", "AdaLoRA")  # MLP writes the same outputs as ResMLP; each arch costs about a second
LOWRANK = {"rank": RANK, "row_hidden": [16], "col_hidden": [16], "dropout": 0.0, "lr": 3e-3, "epochs": 4,
           "allocator_init_warmup": 2, "allocator_final_warmup": 2, "allocator_mask_interval": 1,
           "allocator_keep_ratio": 0.5}
HEAD = {"hidden": 8, "epochs_warm": 1, "epochs_joint": 2, "batch_size": 8, "num_examples": 2}
OPENING = ["Findings", "Warnings"]
TITLES = [*OPENING, "Dataset", "Vision features", "Detection head", "Low-rank feature decomposition",
          "Teacher full fine-tune", "Is ΔW low-rank?"]


def write_features(path, n: int, seed: int):
    """A cached-feature file: low-rank token features, alternating labels, a tampered cell per tampered record."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, GRID * GRID, RANK, generator=g) @ torch.randn(RANK, WIDTH, generator=g)
    labels = torch.arange(n) % 2
    token_masks = torch.zeros(n, GRID, GRID)
    token_masks[labels == 1, 1, 2] = 1.0
    features[:, GRID + 2] += 3.0 * labels[:, None]
    save_tensors(path, {"features": features, "labels": labels, "token_masks": token_masks,
                        "has_mask": torch.ones(n, dtype=torch.uint8)},
                 {"grid_h": GRID, "grid_w": GRID, "image_size": 32})
    return feature_statistics(features, labels, GRID, GRID, spectrum_tokens=64)


def write_teacher(directory):
    """`train_teacher`'s summary and history (the fine-tune itself is tested in test_teacher.py)."""
    directory.mkdir()
    history = [{"step": step, "loss": 6.0 - 0.2 * step, "lr": 1e-3, "samples_per_s": 40.0,
                "val_loss": 5.5 - 0.1 * step if step % 3 == 0 else None} for step in range(1, 7)]
    write_history(history, directory / "history.csv")
    write_json(directory / "train_summary.json", {
        "model": "data/models/tiny", "dtype": "float32", "image_size": 32, "steps": 6, "final_loss": 4.8,
        "final_val_loss": 4.9, "best_val_loss": 4.9, "resumed_from_step": 0, "train_seconds": 1.5, "device": "cpu",
        "mixed_precision": "no", "trainable_parameters": 429504, "peak_memory_mb": 600.0, "processes": 1})


def write_delta(directory):
    """`export_delta`'s outputs for ΔW of a few Qwen-VL-named modules."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.visual.blocks.0.attn.qkv": [24, 8], "model.visual.merger.mlp.0": [16, 16],
              "model.language_model.layers.0.mlp.up_proj": [16, 8],
              "model.language_model.layers.0.self_attn.q_proj": [8, 8]}
    deltas = ((name, torch.randn(*shape, generator=g), 10.0) for name, shape in shapes.items())
    cfg = DeltaConfig(ranks=(2, 4))
    write_delta_outputs(analyse_deltas(deltas, shapes, cfg), directory, cfg,
                        {"base_dir": "base", "teacher_dir": "teacher"}, time.perf_counter())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """All the report's named inputs, as the report rule passes them for a vision-language model."""
    root = tmp_path_factory.mktemp("stages")
    spec = SyntheticSpec(image_size=32, train=4, val=2, test=2)
    generate_synthetic(root / "synthetic", spec)
    prepare_dataset(DatasetConfig(synthetic=spec), root / "synthetic", root / "manifest.json")
    found = {"manifest": root / "manifest.json", "teacher": root / "teacher", "delta": root / "delta"}
    features = {}
    for split, n, seed in (("train", 16, 0), ("val", 8, 1), ("test", 8, 2)):
        features[split] = root / f"{split}.safetensors"
        found[f"stats_{split}"] = root / f"{split}_stats.json"
        write_json(found[f"stats_{split}"], write_features(features[split], n, seed))
    pretrain_head(features["train"], features["val"], features["test"], HeadConfig.from_dict(HEAD), root / "head")
    found |= {f"head_{name}": root / "head" / file for name, file in
              (("metrics", "metrics.json"), ("history", "history.csv"), ("heatmaps", "heatmaps.png"))}
    for arch in ARCHS:
        out = root / "lowrank" / arch
        train_projection(arch, features["train"], features["val"], LOWRANK, out, root / "state" / arch, device="cpu")
        compare_with_svd(arch, out / "model.safetensors", features["test"], LOWRANK, out / "comparison.json",
                         out / "comparison.png", device="cpu")
        found |= {f"lowrank_{name}_{arch}": out / file for name, file in
                  (("comparison", "comparison.json"), ("spatial", "comparison.png"), ("history", "history.json"),
                   ("curve", "loss_curve.png"))}
    write_teacher(root / "teacher")
    write_delta(root / "delta")
    return {name: str(path) for name, path in found.items()}


def render(directory, inputs: dict[str, str]) -> str:
    """The report page written from `inputs`."""
    write_report(directory / "report.html", inputs, "abc123", directory)
    return (directory / "report.html").read_text()


def sections_of(page: str) -> dict[str, str]:
    """{section title: its HTML}, in page order."""
    return dict(re.findall(r'<section id="[\w-]+"><h2>(.*?)</h2>(.*?)</section>', page, re.S))


@pytest.fixture(scope="module")
def page(inputs, tmp_path_factory) -> str:
    return render(tmp_path_factory.mktemp("report"), inputs)


def images(section: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', section)


def test_every_section_renders_with_its_tables_and_figures(page):
    sections = sections_of(page)
    assert list(sections) == TITLES

    head = sections["Detection head"]
    assert images(head) == ["head training curves", "test heat maps"]
    for text in ("<th>roc_auc</th>", "<th>average_precision</th>", "<th>pixel_iou</th>", "<td>all_zero</td>",
                 "<td>best epoch</td>", "<td>val_roc_auc</td>"):
        assert text in head

    lowrank = sections["Low-rank feature decomposition"]
    assert "Eckart–Young" in lowrank
    assert "<th></th><th>ResMLP</th><th>AdaLoRA</th>" in lowrank
    for row in ("MSE ratio network / SVD", "energy captured SVD", "time ratio network / SVD", "stop reason",
                "initial val MSE", "best val MSE", "effective rank"):
        assert f"<td>{row}</td>" in lowrank
    assert images(lowrank) == [alt for arch in ARCHS for alt in (f"{arch} loss curve", f"{arch} vs SVD")]
    assert lowrank.count("<details") == len(ARCHS)

    teacher = sections["Teacher full fine-tune"]
    assert images(teacher) == ["teacher loss curve"]
    for row in ("steps", "best val loss", "mixed precision", "trainable parameters", "peak memory mb",
                "resumed from step"):
        assert f"<td>{row}</td>" in teacher

    delta = sections["Is ΔW low-rank?"]
    assert images(delta) == ["ΔW singular values", "ΔW energy vs rank"]
    for group in ("all", "vision", "merger", "language", "attention", "mlp", "language/mlp"):
        assert f"<td>{group}</td>" in delta
    assert "<th>energy r=2</th><th>energy r=4</th>" in delta
    assert "<pre>ΔW = W_teacher − W_base" in delta


def test_sections_are_left_out_without_their_inputs(inputs, tmp_path):
    text_only = {name: inputs[name] for name in ("manifest", "teacher", "delta")}
    assert list(sections_of(render(tmp_path, text_only))) == [*OPENING, "Dataset", "Teacher full fine-tune",
                                                              "Is ΔW low-rank?"]
    assert list(sections_of(render(tmp_path, {"manifest": inputs["manifest"]}))) == [*OPENING, "Dataset"]

    without = {name: path for name, path in inputs.items()
               if name not in ("head_heatmaps", "lowrank_curve_ResMLP", "delta")}
    sections = sections_of(render(tmp_path, without))
    assert list(sections) == [*OPENING, "Dataset", "Vision features", "Low-rank feature decomposition",
                              "Teacher full fine-tune"]
    lowrank = sections["Low-rank feature decomposition"]
    assert "<th></th><th>AdaLoRA</th></tr>" in lowrank
    assert images(lowrank) == ["AdaLoRA loss curve", "AdaLoRA vs SVD"]


def test_page_is_self_contained(page):
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert all(href.startswith("#") for href in re.findall(r'\bhref="([^"]*)"', page))
    assert not re.search(r"<(?:script|link|iframe)\b|url\(|@import", page)


def test_a_text_dataset_shows_example_texts_instead_of_images(inputs, tmp_path):
    from lowrank_core.data import validate_dataset
    from lowrank_core.io import write_json

    files = {}
    for split in ("train", "val", "test"):
        files[split] = tmp_path / f"{split}.json"
        write_json(files[split], [{"text": f"{split} passage {i} <b>bold</b>", "label": i % 2} for i in range(4)])
    write_json(tmp_path / "manifest.json", {**validate_dataset(files, "text"), "source": str(tmp_path)})
    dataset = sections_of(render(tmp_path, {"manifest": str(tmp_path / "manifest.json"),
                                            "teacher": inputs["teacher"]}))["Dataset"]
    assert images(dataset) == []
    assert "<td>train passage 0 &lt;b&gt;bold&lt;/b&gt;</td>" in dataset and "<td>tampered</td>" in dataset


def test_findings_lead_the_page_with_numbers_from_their_sources(inputs, tmp_path):
    grid = write_grid(tmp_path, GRID_ARMS, seeds=2)
    page = render(tmp_path, {**inputs, **grid})
    assert re.findall(r'<section id="([\w-]+)">', page) == [
        "findings", "warnings", "dataset", "features", "head", "lowrank", "teacher", "delta", "lora"]
    assert page.index("<h2>") == page.index("<h2>Findings")  # the page opens with them, the provenance at its end
    assert page.index('<section id="lora">') < page.index('<h2 id="provenance">') < page.index("package versions")
    assert re.search(r"<th>CPU \(of the report job\)</th><td>[^<]+, (DEFAULT|[A-Z0-9]+)</td>", page)
    anchors = set(re.findall(r'\bid="([\w-]+)"', page))
    links = re.findall(r'href="#([\w-]+)"', page)
    assert {"delta", "effects", "convergence", "lora-comparison", "lowrank"} <= set(links) and set(links) <= anchors

    findings = [html.unescape(re.sub(r"<[^>]+>", "", item)) for item in
                re.findall(r"<li>(.*?)</li>", sections_of(page)["Findings"], re.S)]
    delta = read_json(f"{inputs['delta']}/svd_analysis.json")
    energy = {r: delta["groups"]["all"]["energy"][str(r)] for r in delta["ranks"]}
    assert re.search(r"rank (\d+) holds (\d+)% of", findings[0]).groups() in {(str(r), f"{e * 100:.0f}")
                                                                                 for r, e in energy.items()}
    assert "SVD init vs random: reaches the target loss sooner" in findings[1]  # random never reached it
    assert "50% at r=2, 90% at r=4 of its gain over the base (0.5 → 0.9)" in findings[3]  # references.csv
    ratios = {arch: read_json(inputs[f"lowrank_comparison_{arch}"])["ratio"]["mse"] for arch in ARCHS}
    closest = min(ratios, key=ratios.get)
    assert f"Closest first: {closest} reaches {ratios[closest]:.3g}× the SVD's MSE" in findings[4]


def test_the_dataset_and_table_jobs_load_no_model_library():
    """Those jobs are short and lie on the default's critical path: transformers and PEFT would double their time."""
    probe = ("import sys; from lowrank_core import tables; from lowrank_core.modalities import get_modality; "
             "get_modality('vision_language'); "
             "print(sorted({'transformers', 'peft', 'accelerate'} & set(sys.modules)))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
