"""The teacher full fine-tune and the shared training loop: learning, answer-only labels, resume, clean failures."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import launch_data_parallel, vision_inputs
from lowrank_core import teacher
from lowrank_core.data import validate_dataset
from lowrank_core.errors import ConfigError, LowrankError
from lowrank_core.io import read_json, write_json
from lowrank_core.lm_data import ChatBatcher, lm_loss
from lowrank_core.lora import ArmConfig
from lowrank_core.modalities.vision_language import label_blind_loss
from lowrank_core.modeling import TinyModelSpec, _train_tokenizer, load_model, load_processor
from lowrank_core.training import HISTORY_COLUMNS, Batches, TrainConfig, train_loop

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """(model_info_json, manifest_json) for the tiny model and 16 synthetic images."""
    return vision_inputs(tmp_path_factory.mktemp("teacher_inputs"), tiny_model_dir, IMAGE_SIZE, 10, 4, 2)


@pytest.fixture(scope="module")
def learning_inputs(tiny_model_dir, tmp_path_factory):
    """(model_info_json, manifest_json) for the tiny model and 64 + 16 + 2 synthetic images: enough to generalise."""
    return vision_inputs(tmp_path_factory.mktemp("learning_inputs"), tiny_model_dir, IMAGE_SIZE, 64, 16, 2)


def val_label_blind_loss(tokenizer, cfg: TrainConfig, manifest_json) -> float:
    """The label-blind loss bound on the validation split of `manifest_json` with `cfg`'s answer words."""
    answer_ids = ChatBatcher(tokenizer, cfg.question, cfg.positive_word, cfg.negative_word).answer_ids
    records = read_json(manifest_json)["splits"]["val"]["records"]
    return label_blind_loss(answer_ids, [record["label"] for record in records])


def config(**overrides) -> TrainConfig:
    settings = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "eval_every": 3,
                "checkpoint_every": 2} | overrides
    return TrainConfig.from_dict(settings)


def run_teacher(inputs, root, cfg, image_size=IMAGE_SIZE):
    return teacher.train_teacher(*inputs, cfg, ArmConfig(image_size=image_size), root / "out", root / "state",
                                 root / "tb")


def text_dataset(root, counts=(("train", 16), ("val", 4), ("test", 2))):
    """A text dataset whose label is in the words: tampered passages say "forged", real ones "genuine"."""
    files = {}
    for split, count in counts:
        files[split] = root / f"{split}.json"
        write_json(files[split], [{"text": f"{split} note {i}: the seal is {'forged' if i % 2 else 'genuine'}.",
                                   "label": i % 2} for i in range(count)])
    return files


def test_text_only_causal_lm_learns_from_text_records(tiny_model_dir, tmp_path):
    # the tiny tokenizer and chat template, without the whole answer words the tiny base's pre-training adds: with
    # them this random LM stayed at the label-blind loss on the validation texts (0.349 after 60 steps, measured)
    tokenizer = _train_tokenizer(TinyModelSpec().vocab_size)
    tokenizer.chat_template = load_processor(tiny_model_dir).tokenizer.chat_template
    torch.manual_seed(0)  # the random model's weights, whatever ran before
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "text_model")
    tokenizer.save_pretrained(tmp_path / "text_model")
    write_json(tmp_path / "model.json", {"path": str(tmp_path / "text_model"), "dtype": "float32", "modality": "text"})
    write_json(tmp_path / "manifest.json", validate_dataset(text_dataset(tmp_path), "text"))

    cfg = config(max_steps=60, batch_size=4, lr=1e-2, eval_every=20, checkpoint_every=60)
    summary = run_teacher((tmp_path / "model.json", tmp_path / "manifest.json"), tmp_path, cfg, image_size=None)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert summary["image_size"] is None
    assert history["loss"].tail(5).mean() < 0.1 * history["loss"].head(5).mean()
    assert history["val_loss"].dropna().iloc[-1] < val_label_blind_loss(tokenizer, cfg, tmp_path / "manifest.json")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(tuned, transformers.Qwen2ForCausalLM)


def test_teacher_learns_and_writes_a_loadable_model(tiny_model_dir, learning_inputs, tmp_path):
    # the pre-trained base starts at the label-blind loss (it says the answer words but cannot tell them apart); on 64
    # training images at 3e-4 its held-out loss falls below that bound from about step 60 (0.309-0.317 by step 150
    # against 0.347, measured), and 30 steps on 10 images only memorised them
    cfg = config(max_steps=150, batch_size=8, lr=3e-4, warmup_steps=2, eval_every=50, checkpoint_every=50)
    summary = run_teacher(learning_inputs, tmp_path, cfg)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert tuple(history.columns) == HISTORY_COLUMNS
    assert history["step"].tolist() == list(range(1, 151))
    assert history["loss"].tail(5).mean() < 0.8 * history["loss"].head(5).mean()
    assert history["val_loss"].notna().tolist() == [step % 50 == 0 for step in range(1, 151)]
    tokenizer = load_processor(tiny_model_dir).tokenizer
    assert history["val_loss"].dropna().iloc[-1] < val_label_blind_loss(tokenizer, cfg, learning_inputs[1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert summary["steps"] == 150 and summary["resumed_from_step"] == 0 and summary["device"] == "cpu"
    assert read_json(tmp_path / "out" / "train_summary.json") == summary

    tuned = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    base = load_model(tiny_model_dir)
    assert summary["trainable_parameters"] == sum(p.numel() for p in base.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values())]
    assert all(changed)
    saved_vocab = load_processor(tmp_path / "out").tokenizer.get_vocab()
    assert saved_vocab == load_processor(tiny_model_dir).tokenizer.get_vocab()


def kill_in_step_five(inputs, root, cfg, monkeypatch):
    """Run the teacher until its first micro-batch of step 5 raises, as a killed job would stop."""
    calls = {"train": 0}
    train_loop = teacher.train_loop

    def loop_killed_in_step_five(model, loss_fn, *args, **kwargs):
        def dies_in_step_five(model, batch):
            calls["train"] += model.training
            if calls["train"] == 9:  # first micro-batch of step 5 with grad_accum 2
                raise RuntimeError("killed")
            return loss_fn(model, batch)

        return train_loop(model, dies_in_step_five, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(teacher, "train_loop", loop_killed_in_step_five)
        with pytest.raises(RuntimeError, match="killed"):
            run_teacher(inputs, root, cfg)
    assert not (root / "out").exists()


def assert_same_run(root, reference):
    expected = load_file(reference / "out" / "model.safetensors")
    resumed = load_file(root / "out" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    columns = ["step", "loss", "lr", "val_loss", "val_batch_losses"]
    pd.testing.assert_frame_equal(pd.read_csv(root / "out" / "history.csv")[columns],
                                  pd.read_csv(reference / "out" / "history.csv")[columns])


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """A run of `config(grad_accum=2)` that nothing interrupted: checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_teacher(inputs, root, config(grad_accum=2))
    return root


def test_killed_job_resumes_to_the_same_weights(inputs, uninterrupted, tmp_path, monkeypatch):
    kill_in_step_five(inputs, tmp_path, config(grad_accum=2), monkeypatch)
    assert sorted(p.name for p in (tmp_path / "state" / "checkpoint").iterdir()) == ["step-00000002",
                                                                                     "step-00000004"]
    assert run_teacher(inputs, tmp_path, config(grad_accum=2))["resumed_from_step"] == 4
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.parametrize("damaged, resumed_from", [(["step-00000004"], 2), (["step-00000004", "step-00000002"], 0)])
def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(inputs, uninterrupted, tmp_path, monkeypatch, caplog,
                                                               damaged, resumed_from):
    kill_in_step_five(inputs, tmp_path, config(grad_accum=2), monkeypatch)
    for name in damaged:
        weights = tmp_path / "state" / "checkpoint" / name / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped bit pattern in the last weight: still a loadable file, a wrong checksum
        weights.write_bytes(bytes(data))
    assert run_teacher(inputs, tmp_path, config(grad_accum=2))["resumed_from_step"] == resumed_from
    assert "weights.safetensors fails its checksum" in caplog.text
    assert_same_run(tmp_path, uninterrupted)


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
    with pytest.raises(ConfigError, match=r"^teacher\.gradient_checkpointing: Linear does not support it"):
        train_loop(torch.nn.Linear(2, 1), lambda m, b: m(b["x"]).mean(), batches, batches,
                   config(gradient_checkpointing=True), tmp_path / "state", tmp_path / "tb")


def test_gradient_checkpointing_trains_the_same(inputs, tmp_path):
    plain = run_teacher(inputs, tmp_path / "plain", config(max_steps=2))
    checkpointed = run_teacher(inputs, tmp_path / "checkpointed", config(max_steps=2, gradient_checkpointing=True))
    assert checkpointed["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-4)


def test_a_model_with_tied_embeddings_resumes_to_the_same_loss(tmp_path):
    """A tied lm_head / embedding (as in Qwen2.5-VL-3B) is checkpointed once and resumes exactly."""
    config_ = transformers.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    items = [torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    batches = Batches(items, 4, lambda xs: {"input_ids": torch.stack(xs), "labels": torch.stack(xs)}, seed=0)
    cfg = config(max_steps=4, checkpoint_every=2)
    uninterrupted = train_loop(transformers.Qwen2ForCausalLM(config_), lm_loss, batches, batches, cfg,
                               tmp_path / "state", tmp_path / "tb")
    shutil.rmtree(tmp_path / "state/checkpoint/step-00000004")
    resumed = train_loop(transformers.Qwen2ForCausalLM(config_), lm_loss, batches, batches, cfg, tmp_path / "state",
                         tmp_path / "tb")
    assert resumed.resumed_from_step == 2
    assert resumed.history[-1]["loss"] == pytest.approx(uninterrupted.history[-1]["loss"], rel=1e-6)


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


def launch_teacher(inputs, root, cfg):
    """The teacher trained by 2 gloo processes into `root`; its summary."""
    launch_data_parallel("lowrank_core.teacher:train_teacher",
                         f"{str(inputs[0])!r}, {str(inputs[1])!r}, TrainConfig.from_dict({cfg.to_dict()!r}), "
                         f"ArmConfig(image_size={IMAGE_SIZE}), {str(root / 'out')!r}, {str(root / 'state')!r}, "
                         f"{str(root / 'tb')!r}")
    return read_json(root / "out" / "train_summary.json")


@pytest.mark.parametrize("sharding, parallelism", [("none", "ddp"), ("fsdp", "fsdp")])
def test_two_data_parallel_processes_match_one_process(inputs, tmp_path, caplog, sharding, parallelism):
    """The same global batch split over 2 gloo processes, with the model replicated (DDP) or sharded (FSDP2), ends
    at the weights of a single-process run, gradient accumulation included."""
    cfg = config(batch_size=4, grad_accum=2, checkpoint_every=3, sharding=sharding)
    single = run_teacher(inputs, tmp_path / "single", cfg)
    assert ("teacher.sharding: fsdp needs more than one process" in caplog.text) == (sharding == "fsdp")
    assert "ACCELERATE_USE_FSDP" not in os.environ  # the FSDP plugin leaves nothing behind for later runs
    parallel = tmp_path / "parallel"
    summary = launch_teacher(inputs, parallel, cfg)
    assert (summary["processes"], summary["parallelism"]) == (2, parallelism)
    assert (single["processes"], single["parallelism"]) == (1, "none")
    assert summary["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-4)
    history = pd.read_csv(parallel / "out" / "history.csv")
    assert history["loss"].tolist() == pytest.approx(pd.read_csv(tmp_path / "single/out/history.csv")["loss"].tolist(),
                                                     rel=1e-4)
    one, two = load_file(tmp_path / "single/out/model.safetensors"), load_file(parallel / "out/model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


def test_a_sharded_run_resumes_from_its_checkpoint(inputs, tmp_path):
    """A 2-process FSDP run whose last checkpoint and output are gone resumes from the one before and ends at the
    same weights; its checkpoints hold whole tensors, which a single unsharded process resumes from too."""
    cfg = config(batch_size=4, checkpoint_every=3, sharding="fsdp")
    launch_teacher(inputs, tmp_path, cfg)
    finished = load_file(tmp_path / "out/model.safetensors")
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "state/checkpoint/step-00000006")
    assert launch_teacher(inputs, tmp_path, cfg)["resumed_from_step"] == 3
    resumed = load_file(tmp_path / "out/model.safetensors")
    assert max((finished[k] - resumed[k]).abs().max().item() for k in finished) < 1e-6
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "state/checkpoint/step-00000006")
    assert run_teacher(inputs, tmp_path, config(batch_size=4, checkpoint_every=3))["resumed_from_step"] == 3
    alone = load_file(tmp_path / "out/model.safetensors")
    assert max((finished[k] - alone[k]).abs().max().item() for k in finished) < 1e-4
