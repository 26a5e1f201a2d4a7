"""The instruct modality: its dataset job, the tiny text base, generation-based evaluation with predictions.csv, and
its report section."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
import transformers
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

from lowrank_core import lora
from lowrank_core.data import DatasetConfig
from lowrank_core.errors import DataError
from lowrank_core.grid import STRATEGIES
from lowrank_core.io import read_json, write_json
from lowrank_core.lora import ArmConfig
from lowrank_core.lora_eval import evaluate_reference
from lowrank_core.modalities import get_modality
from lowrank_core.modalities.instruct.synthetic import SyntheticInstructionSpec, generate_synthetic_instructions
from lowrank_core.modalities.instruct.tiny import TinyTextSpec, build_tiny_text_model, tiny_text_skeleton
from lowrank_core.modeling import ModelConfig
from lowrank_core.report_predictions import predictions_section

INSTRUCT = get_modality("instruct")
SMALL = SyntheticInstructionSpec(train=16, val=4, test=6)
TEXT = {"id": str, "prompt": str, "reference": str, "generated": str}  # predictions.csv's text columns


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny text base (random weights, no pre-training) and its model.json."""
    root = tmp_path_factory.mktemp("instruct")
    model_dir = build_tiny_text_model(root / "tiny_text", TinyTextSpec(pretrain_steps=0))
    write_json(root / "model.json", {"path": str(model_dir), "dtype": "float32", "modality": "instruct"})
    return root / "model.json"


def test_the_tiny_base_loads_as_a_causal_lm_with_a_chat_template(base):
    model_dir = read_json(base)["path"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 3?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "2 + 3?" in chat
    skeleton = tiny_text_skeleton(TinyTextSpec())
    assert sorted(name for name, _ in skeleton.named_parameters()) == sorted(name for name, _ in
                                                                           model.named_parameters())
    assert ModelConfig.from_dict({"modality": "instruct"}).tiny_text == TinyTextSpec()


def test_the_dataset_job_checks_every_record_against_the_tokenizer(base, tmp_path):
    data = generate_synthetic_instructions(tmp_path / "data", SMALL)["train"].parent
    manifest = INSTRUCT.prepare_dataset(DatasetConfig(source=str(data)), None, tmp_path / "manifest.json", base,
                                        {"sft": {"max_length": 256}})
    assert [manifest["splits"][split]["count"] for split in ("train", "val", "test")] == [16, 4, 6]
    assert manifest["splits"]["test"]["records"][0]["id"] == "test_00000"
    assert read_json(tmp_path / "manifest.json")["splits"]["train"]["truncated"] == []

    # train_00000 is 40 tokens, 38 of them its prompt; train_00001 is 55, 53 of them its prompt
    with pytest.raises(DataError, match=r"train.json: record 0 \(id 'train_00000'\): is 40 tokens long, over "
                                        r"max_length 39 \(overflow 'truncate' would cut"):
        INSTRUCT.prepare_dataset(DatasetConfig(source=str(data)), None, tmp_path / "short.json", base,
                                 {"sft": {"max_length": 39}})
    assert not (tmp_path / "short.json").exists()
    with pytest.raises(DataError, match=r"record 1 \(id 'train_00001'\): its prompt alone is 53 tokens"):
        INSTRUCT.prepare_dataset(DatasetConfig(source=str(data)), None, tmp_path / "short.json", base,
                                 {"sft": {"max_length": 39, "overflow": "truncate"}})
    cut = INSTRUCT.prepare_dataset(DatasetConfig(source=str(data)), None, tmp_path / "cut.json", base,
                                   {"sft": {"max_length": 54, "overflow": "truncate"}})
    assert "train_00001" in cut["splits"]["train"]["truncated"]  # the ids of the records cut are in the manifest
    assert "train_00000" not in cut["splits"]["train"]["truncated"]


def test_an_id_in_two_splits_fails_naming_the_file(base, tmp_path):
    data = generate_synthetic_instructions(tmp_path / "data", SMALL)["train"].parent
    test = json.loads((data / "test.json").read_text())
    test[1]["id"] = "train_00003"
    (data / "test.json").write_text(json.dumps(test))
    with pytest.raises(DataError, match=r"test.json: id 'train_00003' is also in the train split"):
        INSTRUCT.prepare_dataset(DatasetConfig(source=str(data)), None, tmp_path / "manifest.json", base, {})


def test_a_reference_evaluation_writes_one_prediction_per_test_record(base, tmp_path):
    generate_synthetic_instructions(tmp_path / "data", SMALL)
    manifest = INSTRUCT.prepare_dataset(DatasetConfig(), tmp_path / "data", tmp_path / "manifest.json", base, {})
    arm = ArmConfig.from_dict({"objective": "sft", "sft": {"max_new_tokens": 4}})
    metrics = evaluate_reference(base, tmp_path / "manifest.json", arm, None, tmp_path / "eval" / "base.json",
                                 batch_size=4)
    predictions = pd.read_csv(tmp_path / "eval" / "base_predictions.csv", dtype=TEXT, keep_default_na=False)
    test = manifest["splits"]["test"]["records"]
    assert predictions["id"].tolist() == [record["id"] for record in test]
    assert predictions["reference"].tolist() == [record["messages"][-1]["content"] for record in test]
    assert list(predictions.columns) == ["id", "prompt", "reference", "generated", "score", "numeric"]
    assert metrics["generation"]["n"] == len(test) and metrics["generation"]["exact_match"] == predictions[
        "score"].mean()
    assert metrics["lm"]["tokens"] > 0 and metrics["lm"]["perplexity"] > 1
    assert "predictions" not in read_json(tmp_path / "eval" / "base.json")
    row = INSTRUCT.table_row(read_json(tmp_path / "eval" / "base.json"))
    assert row["exact_match"] == metrics["generation"]["exact_match"] and row["lm_loss"] == metrics["lm"]["loss"]


def test_the_predictions_section_links_every_seeds_predictions(tmp_path):
    runs = pd.DataFrame([{"objective": "sft", "preset": "full-r4", "init": init, "strategy": "all",
                          "learning_rate": "default", "seed": seed, "exact_match": 0.5 + 0.1 * seed,
                          "numeric_accuracy": 0.5, "lm_loss": 1.0, "perplexity": 2.7,
                          "predictions": f"../eval/sft/full-r4/{init}/all/lr_default/seed{seed}/predictions.csv"}
                         for init in ("random", "svd") for seed in (0, 1)])
    runs.to_csv(tmp_path / "ablation.csv", index=False)
    pd.DataFrame([{"model": "base", "exact_match": 0.0, "lm_loss": 3.0,
                   "predictions": "../eval/references/base_predictions.csv"},
                  {"model": "teacher", "exact_match": 0.9, "lm_loss": 0.2,
                   "predictions": "../eval/references/teacher_predictions.csv"}]).to_csv(tmp_path / "references.csv",
                                                                                          index=False)
    section = predictions_section(tmp_path / "ablation.csv", tmp_path / "references.csv")
    assert section.anchor == "predictions"
    assert '<a href="../eval/sft/full-r4/svd/all/lr_default/seed1/predictions.csv">seed 1</a>' in section.html
    assert '<a href="../eval/references/teacher_predictions.csv">predictions</a>' in section.html
    assert "0.55 ± 0.071" in section.html  # the svd arm's exact match over its two seeds
    assert "ROC-AUC" not in section.html  # only the scores the tables have


def test_a_vision_language_model_fine_tunes_on_records_with_images(tiny_model_dir, tmp_path):
    """sft on the tiny Qwen2.5-VL: the images of user turns reach the vision tower, whose adapters train, and every
    test record gets a generated answer."""
    data = tmp_path / "data"
    data.mkdir()
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(data / f"{name}.png")
    for split, count in (("train", 8), ("val", 2), ("test", 2)):
        records = [{"id": f"{split}{i}", "messages": [
            {"role": "user", "content": [{"type": "image", "image_path": f"{colour}.png"},
                                         {"type": "text", "text": "Which colour is the image?"}]},
            {"role": "assistant", "content": colour}]} for i, colour in zip(range(count), itertools.cycle(colours))]
        (data / f"{split}.json").write_text(json.dumps(records))
    write_json(tmp_path / "model.json", {"path": str(tiny_model_dir), "dtype": "float32", "modality": "instruct"})
    INSTRUCT.prepare_dataset(DatasetConfig(source=str(data)), None, tmp_path / "manifest.json", tmp_path / "model.json",
                             {"image_size": 64})
    arm = ArmConfig.from_dict({"objective": "sft", "image_size": 64, "preset": {"r": 4, "alpha": 8},
                               "strategy": STRATEGIES["later_half"], "sft": {"max_new_tokens": 3},
                               "train": {"max_steps": 2, "batch_size": 2, "lr": 0.01, "warmup_steps": 0,
                                         "eval_every": 2, "checkpoint_every": 2}})
    inputs = (tmp_path / "model.json", tmp_path / "manifest.json")
    lora.train_lora(*inputs, arm, tmp_path / "arm", tmp_path / "state", tmp_path / "tb")
    adapter = load_file(tmp_path / "arm" / "adapter" / "adapter_model.safetensors")
    vision = [name for name in adapter if ".visual.blocks." in name and "lora_B" in name]
    assert vision and all(adapter[name].abs().sum() > 0 for name in vision)  # B starts at 0: the images trained it
    evaluate_reference(*inputs, arm, None, tmp_path / "eval" / "base.json", batch_size=2)
    predictions = pd.read_csv(tmp_path / "eval" / "base_predictions.csv", dtype=TEXT, keep_default_na=False)
    assert predictions["id"].tolist() == ["test0", "test1"] and predictions["reference"].tolist() == ["red", "blue"]


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_the_data_driven_inits_start_an_sft_student_from_instruction_batches(base, tmp_path, init):
    """eva / corda / lora_ga read instruction batches (assistant-only labels) for their preprocessing; the arm then
    trains, and its adapter reloads with plain PEFT."""
    generate_synthetic_instructions(tmp_path / "data", SMALL)
    INSTRUCT.prepare_dataset(DatasetConfig(), tmp_path / "data", tmp_path / "manifest.json", base, {})
    arm = ArmConfig.from_dict({"objective": "sft", "init": init, "preset": {"r": 4, "alpha": 8},
                               "strategy": STRATEGIES["all"], "eva": {"batches": 2}, "corda": {"samples": 4},
                               "lora_ga": {"batches": 2},
                               "train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": 2,
                                         "checkpoint_every": 2}})
    stats = lora.train_lora(base, tmp_path / "manifest.json", arm, tmp_path / "arm", tmp_path / "state",
                            tmp_path / "tb")
    assert stats["init_preprocessing"] == "shared" and stats["init_seconds"] > 0 and stats["steps"] == 2
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(read_json(base)["path"]),
                                      tmp_path / "arm" / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
