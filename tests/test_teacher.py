"""The teacher full fine-tune and the shared training loop: learning, answer-only labels, resume, clean failures."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lowrank_core import teacher
from lowrank_core.data import SyntheticSpec, generate_synthetic, validate_dataset
from lowrank_core.errors import ConfigError, LowrankError
from lowrank_core.io import read_json, write_json
from lowrank_core.lm_data import IGNORE_INDEX, ChatBatcher
from lowrank_core.modeling import load_model, load_processor
from lowrank_core.training import HISTORY_COLUMNS, Batches, TrainConfig, train_loop

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """(model_info_json, manifest_json) for the tiny model and 16 synthetic images."""
    root = tmp_path_factory.mktemp("teacher_inputs")
    files = generate_synthetic(root / "data", SyntheticSpec(image_size=IMAGE_SIZE, train=10, val=4, test=2))
    write_json(root / "manifest.json", validate_dataset(files))
    write_json(root / "model.json", {"path": str(tiny_model_dir), "dtype": "float32"})
    return root / "model.json", root / "manifest.json"


def config(**overrides) -> TrainConfig:
    settings = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "eval_every": 3,
                "checkpoint_every": 2} | overrides
    return TrainConfig.from_dict(settings)


def run_teacher(inputs, root, cfg):
    return teacher.train_teacher(*inputs, cfg, IMAGE_SIZE, root / "out", root / "state", root / "tb")


def test_labels_are_ignored_everywhere_but_the_answer(tiny_model_dir, inputs):
    processor = load_processor(tiny_model_dir)
    records = read_json(inputs[1])["splits"]["train"]["records"][:2]
    batcher = ChatBatcher(processor, "Is this image real or tampered?", "tampered", "real", IMAGE_SIZE)
    batch = batcher(records)
    tokenizer = processor.tokenizer
    for row, record in enumerate(records):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        answer = labels != IGNORE_INDEX
        word = "tampered" if record["label"] == 1 else "real"
        assert tokenizer.decode(labels[answer]) == f"{word}<|im_end|>"
        assert torch.equal(labels[answer], ids[answer])
        positions = answer.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))  # one contiguous answer span
        assert batch["attention_mask"][row, positions[-1] + 1:].sum() == 0  # only padding after the answer
        assert batch["attention_mask"][row, :positions[-1] + 1].all()
    image_tokens = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"].bool(), image_tokens)
    assert (batch["labels"][image_tokens] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(1).sum())


def test_text_only_batches_carry_the_question_alone(tiny_model_dir):
    tokenizer = load_processor(tiny_model_dir).tokenizer
    batch = ChatBatcher(tokenizer, "Is this image real or tampered?", "tampered", "real")(
        [{"label": 1}, {"label": 0}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert "<|image_pad|>" not in tokenizer.decode(batch["input_ids"][0])
    assert tokenizer.decode(batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]) == "real<|im_end|>"


def test_text_only_causal_lm_trains_the_same_way(tiny_model_dir, inputs, tmp_path):
    tokenizer = load_processor(tiny_model_dir).tokenizer
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "text_model")
    tokenizer.save_pretrained(tmp_path / "text_model")
    write_json(tmp_path / "model.json", {"path": str(tmp_path / "text_model"), "dtype": "float32"})

    summary = run_teacher((tmp_path / "model.json", inputs[1]), tmp_path, config(max_steps=8, lr=1e-2))
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert summary["image_size"] is None
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(tuned, transformers.Qwen2ForCausalLM)


def test_teacher_learns_and_writes_a_loadable_model(tiny_model_dir, inputs, tmp_path):
    summary = run_teacher(inputs, tmp_path, config(max_steps=30, batch_size=4, warmup_steps=2, eval_every=10,
                                                   checkpoint_every=10))
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert tuple(history.columns) == HISTORY_COLUMNS
    assert history["step"].tolist() == list(range(1, 31))
    assert history["loss"].tail(5).mean() < 0.8 * history["loss"].head(5).mean()
    assert history["val_loss"].notna().tolist() == [step % 10 == 0 for step in range(1, 31)]
    val_loss = history["val_loss"].dropna()
    assert val_loss.iloc[-1] < val_loss.iloc[0]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert summary["steps"] == 30 and summary["resumed_from_step"] == 0 and summary["device"] == "cpu"
    assert read_json(tmp_path / "out" / "train_summary.json") == summary

    tuned = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    base = load_model(tiny_model_dir)
    assert summary["trainable_parameters"] == sum(p.numel() for p in base.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values())]
    assert all(changed)
    saved_vocab = load_processor(tmp_path / "out").tokenizer.get_vocab()
    assert saved_vocab == load_processor(tiny_model_dir).tokenizer.get_vocab()


def test_killed_job_resumes_to_the_same_weights(inputs, tmp_path, monkeypatch):
    cfg = config(grad_accum=2)
    run_teacher(inputs, tmp_path / "uninterrupted", cfg)

    calls = {"train": 0}
    lm_loss = teacher.lm_loss

    def dies_in_step_five(model, batch):
        calls["train"] += model.training
        if calls["train"] == 9:  # first micro-batch of step 5; the last checkpoint is at step 4
            raise RuntimeError("killed")
        return lm_loss(model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(teacher, "lm_loss", dies_in_step_five)
        with pytest.raises(RuntimeError, match="killed"):
            run_teacher(inputs, tmp_path / "killed", cfg)
    assert not (tmp_path / "killed" / "out").exists()
    summary = run_teacher(inputs, tmp_path / "killed", cfg)

    assert summary["resumed_from_step"] == 4
    expected = load_file(tmp_path / "uninterrupted" / "out" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "out" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    columns = ["step", "loss", "lr", "val_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / "out" / "history.csv")[columns],
                                  pd.read_csv(tmp_path / "uninterrupted" / "out" / "history.csv")[columns])


def test_changed_config_starts_over_instead_of_resuming(inputs, tmp_path):
    run_teacher(inputs, tmp_path, config(max_steps=2))
    assert run_teacher(inputs, tmp_path, config(max_steps=2))["resumed_from_step"] == 2
    assert run_teacher(inputs, tmp_path, config(max_steps=2, lr=5e-4))["resumed_from_step"] == 0


def test_exploding_loss_fails_cleanly(inputs, tmp_path):
    with pytest.raises(LowrankError, match=r"training loss is (nan|inf).*lower the learning rate"):
        run_teacher(inputs, tmp_path, config(lr=1e30, max_grad_norm=0.0))
    assert not (tmp_path / "out").exists()


def test_injected_nan_is_caught_by_the_generic_loop(tmp_path):
    model = torch.nn.Linear(2, 1)
    items = [torch.tensor([1.0, float("nan")])] * 4
    batches = Batches(items, 2, lambda xs: {"x": torch.stack(xs)}, seed=0)
    with pytest.raises(LowrankError, match="training loss is nan at step 1"):
        train_loop(model, lambda m, b: m(b["x"]).mean(), batches, batches, config(), tmp_path / "state",
                   tmp_path / "tb")


def test_gradient_checkpointing_requires_model_support(tmp_path):
    batches = Batches([torch.ones(2)] * 2, 2, lambda xs: {"x": torch.stack(xs)})
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        train_loop(torch.nn.Linear(2, 1), lambda m, b: m(b["x"]).mean(), batches, batches,
                   config(gradient_checkpointing=True), tmp_path / "state", tmp_path / "tb")


def test_gradient_checkpointing_trains_the_same(inputs, tmp_path):
    plain = run_teacher(inputs, tmp_path / "plain", config(max_steps=2))
    checkpointed = run_teacher(inputs, tmp_path / "checkpointed", config(max_steps=2, gradient_checkpointing=True))
    assert checkpointed["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-4)


def test_shuffle_is_seeded_per_epoch():
    batches = Batches(list(range(8)), 4, list, seed=3)
    epoch0 = batches.batch(0, 0) + batches.batch(0, 1)
    assert sorted(epoch0) == list(range(8))
    assert epoch0 == Batches(list(range(8)), 4, list, seed=3).batch(0, 0) + batches.batch(0, 1)
    assert epoch0 != batches.batch(1, 0) + batches.batch(1, 1)
    assert list(Batches(list(range(5)), 2, list)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("overrides, key", [
    ({"grad_accum": 0}, "teacher.grad_accum"),
    ({"mixed_precision": "fp8"}, "teacher.mixed_precision"),
    ({"warmup_steps": 50}, "teacher.warmup_steps"),
    ({"negative_word": "tampered"}, "teacher.negative_word"),
    ({"lr": "fast"}, "teacher.lr"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TrainConfig.from_dict(overrides)
