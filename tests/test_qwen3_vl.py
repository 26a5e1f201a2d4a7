"""The tiny Qwen3-VL (`model.tiny.arch: qwen3_vl`): a real Qwen3-VL checkpoint, hybrid fusion tokens on it, and the
default study end to end on it (config/examples/qwen3_vl_tiny.yaml)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import REPORT, grid_tables, run_to_report
from lowrank_core.errors import ConfigError
from lowrank_core.lm_data import ChatBatcher
from lowrank_core.lora import ArmConfig, build_student
from lowrank_core.modalities import get_modality
from lowrank_core.modalities.vision_language import fusion_inputs
from lowrank_core.modeling import ModelConfig, TinyModelSpec, build_tiny_model, load_model, load_processor

QUESTION = "Is this image real or tampered? Answer with one word."


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    """The tiny Qwen3-VL without pre-training (its shape and wiring are what these unit tests read)."""
    spec = TinyModelSpec(arch="qwen3_vl", pretrain_vision_steps=0, pretrain_language_steps=0)
    return build_tiny_model(tmp_path_factory.mktemp("qwen3") / "tiny", spec)


def batch_of(processor, labels, fusion_tokens=0):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in labels]
    batcher = ChatBatcher(processor, QUESTION, "tampered", "real", 64, fusion_tokens=fusion_tokens)
    return batcher([{"image": image, "label": label} for image, label in zip(images, labels)])


def test_the_tiny_qwen3_vl_is_a_real_checkpoint_that_reloads(qwen3_dir):
    config = json.loads((qwen3_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1, 2]  # 1/4, 1/2, 3/4 of 4 blocks
    model = load_model(qwen3_dir).eval()
    again = transformers.Qwen3VLForConditionalGeneration.from_pretrained(qwen3_dir).eval()
    assert isinstance(model, transformers.Qwen3VLForConditionalGeneration)
    assert len(model.model.visual.deepstack_merger_list) == 3
    processor = load_processor(qwen3_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.image_processor.patch_size == 4 and processor.image_processor.merge_size == 2
    assert not processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>system")  # Qwen3-VL's template has no default system turn
    batch = batch_of(processor, [1, 0])
    assert "mm_token_type_ids" in batch and int((batch["mm_token_type_ids"] == 1).sum()) == 2 * 64  # 8x8 tokens
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)


def test_hybrid_fusion_tokens_reach_qwen3_vl_through_inputs_embeds(qwen3_dir):
    """Writing the pad token's own embedding at the fusion positions gives exactly the plain forward (image tokens,
    DeepStack injection and multimodal positions all in place); other embeddings change the answer."""
    model, processor = load_model(qwen3_dir).eval(), load_processor(qwen3_dir)
    batch = batch_of(processor, [1, 0], fusion_tokens=2)
    fusion_mask = batch.pop("fusion_mask")
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        assert len(features.deepstack_features) == 3
        plain = model(**batch).logits
        pad = model.get_input_embeddings()(batch["input_ids"])[fusion_mask.bool()]
        same = model(**fusion_inputs(model, batch, pad, fusion_mask, features)).logits
        other = model(**fusion_inputs(model, batch, torch.randn_like(pad), fusion_mask, features)).logits
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(other, plain, atol=1e-4)


def test_a_hybrid_student_trains_on_qwen3_vl(qwen3_dir):
    info = {"path": str(qwen3_dir), "dtype": "float32", "modality": "vision_language"}
    arm = ArmConfig.from_dict({"objective": "hybrid", "preset": {"r": 4, "alpha": 8},
                               "strategy": {"vision": "0.5:1", "merger": True, "language": "0.5:1", "lm_head": True},
                               "image_size": 64, "head": {"hidden": 16}})
    student, targets, processor = build_student(info, arm)
    assert {f"model.visual.deepstack_merger_list.{i}.linear_fc1" for i in range(3)} <= set(targets)
    batch = get_modality("vision_language").batcher(processor, arm)([
        {"image_path": None, "image": image, "label": label, "mask_path": "64x64"}
        for image, label in zip([Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(2)], [1, 0])])
    loss = student(batch)
    loss.backward()
    assert math.isfinite(loss.item())
    assert student.fusion.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.model.named_parameters()
               if "deepstack_merger_list" in n and "lora_B" in n)  # lora_A's gradient is 0 while B is


def test_a_bad_tiny_arch_names_its_key():
    with pytest.raises(ConfigError, match=r"^model\.tiny\.arch: 'qwen4_vl' is not one of qwen2_5_vl, qwen3_vl$"):
        ModelConfig.from_dict({"tiny": {"arch": "qwen4_vl"}})


EXAMPLE = "config/examples/qwen3_vl_tiny.yaml"
OBJECTIVES = ("lm", "head_frozen", "head", "hybrid", "hybrid_frozen")
# Test ROC-AUC over 96 test images is within about ±0.06 of its true value: a teacher that learned the task gains at
# least 0.1 over the base (blind, 0.5), which no noise of this size explains.
TEACHER_MARGIN = 0.1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The reduced example run from a clean copy of the workflow to the report."""
    return run_to_report(tmp_path_factory.mktemp("qwen3_run"), "config/config.yaml", EXAMPLE)[0]


def test_the_default_study_runs_end_to_end_on_the_tiny_qwen3_vl(finished_run):
    model = json.loads((finished_run / "results/model/model.json").read_text())
    assert model["model_type"] == "qwen3_vl" and model["architectures"] == ["Qwen3VLForConditionalGeneration"]
    runs, references = grid_tables(finished_run)
    assert set(runs["objective"]) == set(OBJECTIVES) and set(runs["init"]) == {"random", "svd"}
    assert runs["roc_auc"].notna().all() and runs["accuracy"].notna().all()
    heads = runs[runs["objective"] != "lm"]
    assert heads["pixel_f1"].notna().all() and (heads["source"] == "head").all()
    assert runs.loc[runs["objective"].isin(["lm", "hybrid", "hybrid_frozen"]), "lm_loss"].notna().all()
    page = (finished_run / REPORT).read_text()
    findings = page[page.index('<section id="findings">'):page.index('<section id="warnings">')]
    assert "Is ΔW low-rank" in findings and "How far is the best LoRA arm from the full fine-tune" in findings
    print(f"tiny Qwen3-VL study: base {references.at['base', 'roc_auc']:.3f}, teacher "
          f"{references.at['teacher', 'roc_auc']:.3f}; "
          + ", ".join(f"{o} {v:.3f}" for o, v in runs.groupby("objective")["roc_auc"].mean().items()))


def test_the_tiny_qwen3_vl_teacher_learns_beyond_the_base(finished_run):
    """On the default's data and pre-training the Qwen3-VL teacher learns the label too (test ROC-AUC 0.872 against
    the base's 0.500 on the AMD EPYC; 0.53-0.62 on the earlier data, where this was an expected failure)."""
    _, references = grid_tables(finished_run)
    base, teacher = references.at["base", "roc_auc"], references.at["teacher", "roc_auc"]
    assert teacher >= base + TEACHER_MARGIN, f"teacher {teacher:.3f} vs base {base:.3f}"
