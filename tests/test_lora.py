"""LoRA arms: the grid, where adapters go, where each init starts, objectives, saving, reloading and resuming."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import assert_reloads_to_trained, launch_data_parallel, vision_inputs
from lowrank_core import lora
from lowrank_core.data import load_image
from lowrank_core.delta import DeltaConfig, export_delta
from lowrank_core.errors import CheckpointError, ConfigError
from lowrank_core.generation import greedy_generate
from lowrank_core.grid import (PRESETS, STRATEGIES, arm_label, arm_path, arm_train_settings, grid_arms, grid_presets,
                               named_entries)
from lowrank_core.io import load_tensors, read_json
from lowrank_core.lora import ArmConfig, PresetConfig, build_student, load_student
from lowrank_core.lora_eval import convergence, delta_distance, merge_factors
from lowrank_core.modalities import get_modality
from lowrank_core.modalities.vision_language import BATCH_EXTRAS, answer_logprobs, label_blind_loss
from lowrank_core.targets import StrategyConfig, resolve_targets, select_layers
from lowrank_core.modeling import load_model, load_processor

IMAGE_SIZE = 32
VL = get_modality("vision_language")
VISION = "model.visual.blocks.{}.attn.{}"
LANGUAGE = "model.language_model.layers.{}.self_attn.{}_proj"


def arm(**overrides) -> ArmConfig:
    settings = {"objective": "lm", "init": "random", "preset": {**PRESETS["standard"], "r": 4, "alpha": 8},
                "strategy": STRATEGIES["later_half"], "image_size": IMAGE_SIZE, "head": {"hidden": 16},
                "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2,
                          "checkpoint_every": 2}} | overrides
    return ArmConfig.from_dict(settings)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """(model_info_json, manifest_json) for the tiny model and a few synthetic images."""
    return vision_inputs(tmp_path_factory.mktemp("lora_inputs"), tiny_model_dir, IMAGE_SIZE, 8, 4, 4)


@pytest.fixture(scope="module")
def delta_dir(tiny_model_dir, tmp_path_factory):
    """ΔW factors (rank 4 and 8, alpha = r) of a 'teacher' that moved the tiny model's attention weights."""
    root = tmp_path_factory.mktemp("delta")
    teacher = load_model(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if name.endswith(("attn.qkv.weight", "attn.proj.weight", "self_attn.q_proj.weight")):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    teacher.save_pretrained(root / "teacher")
    export_delta(tiny_model_dir, root / "teacher", root / "delta", DeltaConfig(ranks=(4, 8)))
    return root / "delta"


def model_info(model_dir) -> dict:
    return {"path": str(model_dir), "dtype": "float32", "modality": "vision_language"}


def student_of(model_dir, settings: ArmConfig, **paths):
    """(student, targets) of `build_student` on the model in `model_dir`."""
    student, targets, _ = build_student(model_info(model_dir), settings, **paths)
    return student, targets


def weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in names}


# ---------------------------------------------------------------- the grid


def test_one_at_a_time_varies_each_axis_around_the_first_entries():
    grid = {"objectives": ["head_frozen", "lm"], "presets": ["standard", "light", "full"],
            "inits": ["random", "svd"], "strategies": ["later_half"], "seeds": [0, 1],
            "extra_arms": [{"objective": "lm", "preset": "light", "init": "svd", "strategy": "all"},
                           {"objective": "lm", "preset": "standard", "init": "random", "strategy": "later_half"}]}
    arms = grid_arms({"grid": grid})
    combos = {(a["objective"], a["preset"], a["init"], a["strategy"]) for a in arms}
    baseline = ("head_frozen", "standard", "random", "later_half")
    assert combos == {baseline, ("lm", *baseline[1:]), ("head_frozen", "light", "random", "later_half"),
                      ("head_frozen", "full", "random", "later_half"), ("head_frozen", "standard", "svd", "later_half"),
                      ("lm", "light", "svd", "all")}
    assert len(arms) == 2 * len(combos)  # the duplicate extra arm counts once; every arm under both seeds


def test_product_design_takes_every_combination():
    grid = {"design": "product", "objectives": ["head", "lm"], "presets": ["light", "full"],
            "inits": ["random", "svd", "pissa"], "strategies": ["all"], "seeds": [3]}
    arms = grid_arms({"grid": grid})
    assert len(arms) == 2 * 2 * 3 and {a["seed"] for a in arms} == {3}


def test_the_learning_rate_axis_expands_like_the_others_and_replaces_every_objectives_lr():
    grid = {"objectives": ["lm", "head"], "presets": ["full"], "inits": ["random", "svd"], "strategies": ["all"],
            "lrs": [0.002, 1e-4], "seeds": [0],
            "extra_arms": [{"objective": "head", "preset": "full", "init": "svd", "strategy": "all", "lr": 1e-4}]}
    arms = grid_arms({"grid": grid})
    assert [arm_label(arm) for arm in arms] == ["lm/full/random/all/lr_0.002", "head/full/random/all/lr_0.002",
                                                "lm/full/svd/all/lr_0.002", "lm/full/random/all/lr_0.0001",
                                                "head/full/svd/all/lr_0.0001"]
    product = grid_arms({"grid": {**grid, "design": "product", "extra_arms": []}})
    assert len(product) == 2 * 2 * 2 and {arm["learning_rate"] for arm in product} == {"0.002", "0.0001"}
    lora = {"train": {"lr": 0.005, "max_steps": 80, "batch_size": 8}, "train_by_objective": {"lm": {"lr": 0.002}}}
    swept = [arm_train_settings(lora, objective, "0.0001") for objective in ("lm", "head")]
    assert swept == [{"lr": 1e-4, "max_steps": 80, "batch_size": 8}] * 2  # same budget, only the lr replaced
    assert arm_train_settings(lora, "lm", "default")["lr"] == 0.002 and arm_train_settings(lora, "head",
                                                                                            "default")["lr"] == 0.005


@pytest.mark.parametrize("rule, alphas", [("r", [4, 16]), ("2r", [8, 32]), (24, [24, 24])])
def test_a_rank_sweep_is_one_preset_per_rank_with_its_alpha_rule(rule, alphas):
    lora = {"presets": {"full": {"dropout": 0.0}},
            "grid": {"design": "product", "objectives": ["lm"], "presets": ["full", "light"],
                     "inits": ["random", "svd"], "strategies": ["all"], "ranks": [4, 16], "rank_alpha": rule}}
    arms = grid_arms(lora)
    assert [arm["preset"] for arm in arms if arm["init"] == "svd"] == ["full-r4", "full-r16", "light-r4", "light-r16"]
    presets = grid_presets(lora)
    assert [presets[f"full-r{rank}"] for rank in (4, 16)] == [
        {**PRESETS["full"], "dropout": 0.0, "r": rank, "alpha": alpha} for rank, alpha in zip((4, 16), alphas)]
    assert presets["light-r4"]["target_modules"] == PRESETS["light"]["target_modules"]


def test_without_an_lr_axis_labels_leave_it_out_and_paths_say_default():
    arm = grid_arms({"grid": {"objectives": ["lm"], "presets": ["full"], "inits": ["random"],
                              "strategies": ["all"]}})[0]
    assert arm["learning_rate"] == "default" and arm_label(arm) == "lm/full/random/all"
    assert arm_path(arm) == "lm/full/random/all/lr_default/seed0"


@pytest.mark.parametrize("grid, key", [
    ({"extra_arms": [{"objective": "lm", "preset": "light", "init": "random", "strategy": "all", "lr": 0.5}],
      "lrs": [0.1]}, "lora.grid.extra_arms[0].lr"),
    ({"presets": ["huge"]}, "lora.grid.presets"),
    ({"objectives": []}, "lora.grid.objectives"),
    ({"extra_arms": [{"objective": "lm", "preset": "light", "init": "lora-fa", "strategy": "all"}]},
     "lora.grid.extra_arms[0].init"),
])
def test_unknown_grid_entries_name_their_key(grid, key):
    base = {"objectives": ["lm"], "presets": ["light"], "inits": ["random"], "strategies": ["all"]}
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.").replace("[", r"\[")):
        grid_arms({"grid": base | grid})


def test_config_presets_override_builtin_fields_and_add_new_ones():
    arms = grid_arms({"presets": {"light": {"r": 2}, "tiny": {"r": 1}},
                      "grid": {"objectives": ["lm"], "presets": ["light", "tiny"], "inits": ["random"],
                               "strategies": ["all"]}})
    assert [a["preset"] for a in arms] == ["light", "tiny"]
    assert named_entries(PRESETS, {"light": {"r": 2}})["light"] == {**PRESETS["light"], "r": 2}


# ---------------------------------------------------------------- where adapters go


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.mark.parametrize("strategy, preset, towers, expected", [
    ("later_half", "light", {"vision", "merger", "language", "lm_head"},
     [VISION.format(b, k) for b in (2, 3) for k in ("qkv",)] + [LANGUAGE.format(l, k) for l in (2, 3) for k in "qv"]
     + ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"]),
    ("later_half", "standard", {"vision", "merger"},  # head objectives: no language model, no lm_head
     [VISION.format(b, k) for b in (2, 3) for k in ("qkv", "proj")]
     + ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]),
    ("head_only", "full", {"vision", "merger", "language", "lm_head"}, ["lm_head"]),
])
def test_strategy_and_preset_resolve_to_full_module_names(tiny_model, strategy, preset, towers, expected):
    targets = resolve_targets(tiny_model, PresetConfig.from_dict(PRESETS[preset]),
                              StrategyConfig.from_dict(STRATEGIES[strategy]), towers)
    assert sorted(targets) == sorted(expected)


def test_language_mlp_kinds_never_catch_the_vision_mlp(tiny_model):
    targets = resolve_targets(tiny_model, PresetConfig.from_dict({"target_modules": ["gate_proj"]}),
                              StrategyConfig.from_dict({"language": "all"}), {"vision", "language"})
    assert targets == [f"model.language_model.layers.{i}.mlp.gate_proj" for i in range(4)]


@pytest.mark.parametrize("selection, layers", [("all", {0, 1, 2, 3}), ("none", set()), ("0.5:1", {2, 3}),
                                               ("0:0.25", {0}), ("1-2", {1, 2}), ([0, 3], {0, 3})])
def test_layer_selections(selection, layers):
    assert select_layers(selection, 4, "k") == layers


def test_a_layer_outside_the_model_names_the_strategy_key(tiny_model):
    strategy = StrategyConfig.from_dict({"vision": [7, 15, 23, 31]}, "lora.strategies.forgery")
    with pytest.raises(ConfigError, match=r"^lora\.strategies\.vision: layer 7 is outside this model's 4 blocks"):
        resolve_targets(tiny_model, PresetConfig(), strategy, {"vision"})
    with pytest.raises(ConfigError, match=r"^lora\.strategies\.x\.language: 'later' is not all"):
        StrategyConfig.from_dict({"language": "later"}, "lora.strategies.x")


def test_a_module_kind_that_matches_nothing_the_strategy_selects_names_the_preset(tiny_model):
    preset = PresetConfig.from_dict({"target_modules": ["q_proj", "foo_proj"]})
    with pytest.raises(ConfigError, match=r"^lora\.presets\.typo\.target_modules: 'foo_proj' matches no module in "
                                          r"the blocks lora\.strategies\.later_half selects"):
        resolve_targets(tiny_model, preset, StrategyConfig.from_dict(STRATEGIES["later_half"]), {"vision", "merger"},
                        "lora.strategies.later_half", "lora.presets.typo")
    # heads only: no block is selected, so no kind is used (merger and lm_head take all their linear modules)
    assert resolve_targets(tiny_model, preset, StrategyConfig.from_dict(STRATEGIES["head_only"]),
                           {"vision", "merger", "language", "lm_head"}) == ["lm_head"]


def test_qwen3_vl_shaped_model_resolves_its_own_module_names():
    config = transformers.Qwen3VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           out_hidden_size=32, deepstack_visual_indexes=[1, 2], num_position_embeddings=64),
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}))
    model = transformers.Qwen3VLForConditionalGeneration(config)
    preset = PresetConfig.from_dict(PRESETS["full"])
    targets = resolve_targets(model, preset, StrategyConfig.from_dict({"vision": [3], "language": "3-3"}),
                              {"vision", "merger", "language", "lm_head"})
    assert targets == [f"model.visual.blocks.3.{m}" for m in ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")] \
        + [f"model.language_model.layers.3.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                           "mlp.down_proj")]
    merger = resolve_targets(model, preset, StrategyConfig.from_dict({"merger": True}), {"merger"})
    assert merger == ["model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"] + [
        f"model.visual.deepstack_merger_list.{i}.linear_fc{j}" for i in (0, 1) for j in (1, 2)]


# ---------------------------------------------------------------- where each init starts


@pytest.mark.parametrize("init", ["random", "gaussian", "pissa", "olora"])
def test_peft_inits_start_at_the_base_weights(tiny_model_dir, tiny_model, init):
    student, targets = student_of(tiny_model_dir, arm(init=init, pissa_niter=0))
    merged = student.model.merge_and_unload()
    base = weights(tiny_model, targets)
    for name, weight in weights(merged, targets).items():
        torch.testing.assert_close(weight, base[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_hold_their_part_of_the_base_weight(tiny_model_dir, tiny_model, init):
    """PiSSA's adapter holds the top-r singular part of W, OLoRA's the first r columns of W's QR factorisation (both
    checked against torch's own decompositions); an init that fell back to random (B = 0) would hold nothing."""
    student, targets = student_of(tiny_model_dir, arm(init=init, pissa_niter=0))
    for name in targets:
        layer = student.model.get_base_model().get_submodule(name)
        r, scaling = layer.r["default"], layer.scaling["default"]
        held = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() * scaling
        weight = tiny_model.get_submodule(name).weight.detach().double()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            expected = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        else:
            Q, R = torch.linalg.qr(weight)
            expected = scaling * Q[:, :r] @ R[:r]
        torch.testing.assert_close(held, expected, atol=1e-4, rtol=1e-3, msg=name)


def test_answer_logprobs_sum_the_log_probabilities_of_the_labelled_tokens():
    """Hand-computed: the logits at position t predict token t + 1; only labelled (answer) tokens count."""
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, -100, 1, 2]])  # position 1 predicts token 1 (0.8), position 2 token 2 (0.4)
    total, count = answer_logprobs(logits, labels)
    assert total.item() == pytest.approx(math.log(0.8) + math.log(0.4), rel=1e-5) and count.tolist() == [2]


@pytest.mark.parametrize("alpha, rslora", [(8, False), (3, True)])
def test_svd_init_starts_at_base_plus_the_teachers_rank_r_delta(tiny_model_dir, tiny_model, delta_dir, alpha, rslora):
    settings = arm(init="svd", preset={**PRESETS["standard"], "r": 4, "alpha": alpha, "use_rslora": rslora})
    student, targets = student_of(tiny_model_dir, settings, delta_dir=delta_dir)
    teacher = load_model(delta_dir.parent / "teacher")
    merged = student.model.merge_and_unload()
    changed = 0
    for name in targets:
        base = tiny_model.get_submodule(name).weight
        delta = teacher.get_submodule(name).weight - base
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # float32's is off by 1e-5 at σ_4 ≈ σ_5
        expected = base + ((U[:, :4] * S[:4]) @ Vh[:4]).float() if delta.any() else base
        torch.testing.assert_close(merged.get_submodule(name).weight, expected, atol=1e-5, rtol=1e-4, msg=name)
        changed += bool(delta.any())
    assert changed == 6  # q_proj of 2 language layers, qkv + proj of 2 vision blocks


def test_svd_init_needs_factors_of_the_presets_rank(tiny_model_dir, delta_dir):
    settings = arm(init="svd", preset={**PRESETS["full"], "r": 16})
    with pytest.raises(ConfigError, match=r"^delta\.ranks: init svd needs factors of rank >= 16"):
        student_of(tiny_model_dir, settings, delta_dir=delta_dir)


def test_svd_with_dora_is_refused():
    with pytest.raises(ConfigError, match=r"^lora\.grid\.inits: svd .* cannot start a preset with use_dora"):
        arm(init="svd", preset={"use_dora": True})


def test_a_batch_larger_than_the_training_split_names_the_arms_key(inputs, tmp_path):
    with pytest.raises(ConfigError, match=r"^lora\.train\.batch_size: 16 is more than the 8 training records"):
        run_arm(inputs, tmp_path, arm(train={"batch_size": 16}))
    assert not (tmp_path / "out").exists()


def test_sharded_arms_are_refused():
    with pytest.raises(ConfigError, match=r"^lora\.train\.sharding: fsdp is for the teacher"):
        arm(train={"sharding": "fsdp"})


def test_frozen_head_objective_without_a_head_checkpoint_fails_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="head.safetensors: head checkpoint file does not exist"):
        student_of(tiny_model_dir, arm(objective="head_frozen"),
                      head_path=tmp_path / "head.safetensors")


# ---------------------------------------------------------------- objectives, saving, reloading, resuming


def run_arm(inputs, root, settings, **paths):
    return lora.train_lora(*inputs, settings, root / "out", root / "state", root / "tb", **paths)


@pytest.mark.parametrize("objective", ["head", "lm", "hybrid"])
def test_every_objective_trains_and_writes_its_outputs(inputs, tmp_path, objective):
    stats = run_arm(inputs, tmp_path, arm(objective=objective))
    out = tmp_path / "out"
    history = (out / "history.csv").read_text().splitlines()
    assert history[0] == "step,loss,lr,samples_per_s,val_loss,val_batch_losses,elapsed_s" and len(history) == 5
    assert (out / "head.safetensors").exists() == (objective != "lm")
    assert (out / "fusion.safetensors").exists() == (objective == "hybrid")
    assert set(read_json(out / "target_modules.json")) == set(
        read_json(out / "adapter" / "adapter_config.json")["target_modules"])
    saved = read_json(out / "train_stats.json")
    assert saved["trainable_parameters"] == stats["trainable_parameters"] > 0
    assert 0 < saved["trainable_percent"] < 100 and saved["adapter_bytes"] > 0 and saved["peak_memory_mb"] > 0
    assert set(saved["versions"]) == {"torch", "transformers", "peft", "lowrank_core"}


@pytest.mark.parametrize("init", ["pissa", "random"])
def test_saved_adapter_reloads_with_plain_peft_to_the_trained_outputs(inputs, tiny_model_dir, tmp_path, init):
    """The adapter on disk (converted to plain LoRA for PiSSA) reproduces the in-training model on a fresh base."""
    settings = arm(init=init, pissa_niter=0)
    run_arm(inputs, tmp_path, settings)
    processor = load_processor(tiny_model_dir)
    trained, _ = student_of(tiny_model_dir, settings)  # same deterministic init ...
    checkpoint, _ = load_tensors(tmp_path / "state" / "checkpoint" / "step-00000004" / "weights.safetensors")
    trained.load_state_dict(checkpoint, strict=False)  # ... plus the trained adapter weights
    records = read_json(inputs[1])["splits"]["test"]["records"]
    batch = VL.batcher(processor, settings)(records)
    inputs_only = {k: v for k, v in batch.items() if k not in BATCH_EXTRAS}
    assert_reloads_to_trained(trained, tmp_path / "out" / "adapter", tiny_model_dir, inputs_only)


def test_trained_arm_reloads_for_evaluation_with_its_head(inputs, tiny_model_dir, tmp_path):
    settings = arm(objective="hybrid")
    run_arm(inputs, tmp_path, settings)
    processor = load_processor(tiny_model_dir)
    student, targets, _ = load_student(model_info(tiny_model_dir), settings, tmp_path / "out")
    records = read_json(inputs[1])["splits"]["val"]["records"]
    loss = student(VL.batcher(processor, settings)(records))
    assert math.isfinite(loss.item()) and targets == read_json(tmp_path / "out" / "target_modules.json")


def test_killed_arm_resumes_to_the_same_adapter(inputs, tmp_path, monkeypatch):
    settings = arm(objective="head")
    run_arm(inputs, tmp_path / "whole", settings)
    calls = {"train": 0}
    student_loss = lora.student_loss

    def dies_in_step_four(model, batch):
        calls["train"] += model.training
        if calls["train"] == 4:
            raise RuntimeError("killed")
        return student_loss(model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(lora, "student_loss", dies_in_step_four)
        with pytest.raises(RuntimeError, match="killed"):
            run_arm(inputs, tmp_path / "killed", settings)
    assert not (tmp_path / "killed" / "out").exists()
    resumed = run_arm(inputs, tmp_path / "killed", settings)
    assert resumed["resumed_from_step"] == 2
    history = pd.read_csv(tmp_path / "killed" / "out" / "history.csv")
    assert history["elapsed_s"].is_monotonic_increasing  # the train time runs on over the resume: the steps before
    # the kill count in the arm's train_seconds
    assert resumed["train_seconds"] >= history["elapsed_s"].iloc[-1]  # and the last checkpoint's save
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        expected = load_file(tmp_path / "whole" / "out" / name)
        resumed = load_file(tmp_path / "killed" / "out" / name)
        assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_a_changed_preset_starts_over_instead_of_resuming(inputs, tmp_path):
    run_arm(inputs, tmp_path, arm())
    changed = dataclasses.replace(arm(), preset=PresetConfig.from_dict({**PRESETS["standard"], "r": 2}))
    assert run_arm(inputs, tmp_path, changed)["resumed_from_step"] == 0


def test_two_data_parallel_processes_match_one_process(inputs, tmp_path):
    """The same global batch split over 2 gloo processes ends at the adapter of a single-process run (dropout 0:
    the processes draw different dropout masks than one process would)."""
    settings = arm(preset={**PRESETS["standard"], "r": 4, "alpha": 8, "dropout": 0.0},
                   train={"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 2})
    single = run_arm(inputs, tmp_path / "single", settings)
    parallel = tmp_path / "parallel"
    launch_data_parallel("lowrank_core.lora:train_lora",
                         f"{str(inputs[0])!r}, {str(inputs[1])!r}, ArmConfig.from_dict({settings.to_dict()!r}), "
                         f"{str(parallel / 'out')!r}, {str(parallel / 'state')!r}, {str(parallel / 'tb')!r}")
    stats = read_json(parallel / "out" / "train_stats.json")
    assert (stats["processes"], single["processes"]) == (2, 1)
    losses = [pd.read_csv(root / "out" / "history.csv")["loss"].tolist() for root in (tmp_path / "single", parallel)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    one, two = (load_file(root / "out" / "adapter" / "adapter_model.safetensors") for root in (tmp_path / "single",
                                                                                                parallel))
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


@pytest.mark.parametrize("init", ["svd", "random"])
def test_delta_distance_at_the_start_is_what_the_rank_r_truncation_leaves(tiny_model_dir, delta_dir, init):
    """Before training, ‖ΔW_student − ΔW_teacher‖/‖ΔW_teacher‖ is sqrt(1 − rank-r energy) for svd, 1 for random."""
    student, targets = student_of(tiny_model_dir, arm(init=init),
                                     delta_dir=delta_dir)
    teacher, base = load_model(delta_dir.parent / "teacher"), load_model(tiny_model_dir)
    residual = total = 0.0
    for name in targets:
        delta = teacher.get_submodule(name).weight - base.get_submodule(name).weight
        singular = torch.linalg.svdvals(delta)
        residual, total = residual + float((singular[4:] ** 2).sum()), total + float((singular ** 2).sum())
    distance = delta_distance(student, targets, tiny_model_dir, delta_dir.parent / "teacher")
    assert distance["modules"] == 6
    expected = math.sqrt(residual / total) if init == "svd" else 1.0
    assert distance["relative_distance"] == pytest.approx(expected, rel=1e-4)


def test_distance_by_module_group_pools_to_the_overall_distance(tiny_model_dir, delta_dir):
    """Each group's distance is its own modules' ‖ΔW_student − ΔW_teacher‖ / ‖ΔW_teacher‖; a random start has not
    moved any weight, so every group is at 1, and the groups cover the vision attention and language q_proj."""
    student, targets = student_of(tiny_model_dir, arm(init="random"),
                                     delta_dir=delta_dir)
    distance = delta_distance(student, targets, tiny_model_dir, delta_dir.parent / "teacher")
    groups = {(g["tower"], g["kind"], g["layer"]): g["relative_distance"] for g in distance["groups"]}
    assert {tower for tower, _, _ in groups} == {"vision", "language"} and {k for _, k, _ in groups} == {"attention"}
    assert all(value == pytest.approx(1.0) for value in groups.values())


def test_merged_delta_reference_is_the_base_plus_the_rank_r_truncated_svd(tiny_model_dir, delta_dir):
    """The teacher_r{r} reference: base weights plus ΔW_r, checked against torch's own SVD of teacher − base."""
    model, base = load_model(tiny_model_dir), load_model(tiny_model_dir)
    teacher = load_model(delta_dir.parent / "teacher")
    assert merge_factors(model, delta_dir / "factors_r4.safetensors") == 4
    name = "model.visual.blocks.0.attn.qkv"
    delta = teacher.get_submodule(name).weight - base.get_submodule(name).weight
    U, S, Vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    expected = base.get_submodule(name).weight.double() + U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    assert torch.allclose(model.get_submodule(name).weight.double(), expected, atol=1e-5)
    untouched = "model.visual.blocks.0.mlp.up_proj"
    assert torch.equal(model.get_submodule(untouched).weight, base.get_submodule(untouched).weight)


def test_convergence_reads_the_final_loss_and_the_target_from_5_step_running_means(tmp_path):
    losses = [2.0, 1.0, 0.6, 0.4, 0.4, 0.4, 0.4, 0.4, 0.1]
    pd.DataFrame({"step": range(1, 10), "loss": losses, "val_loss": [None] * 8 + [0.5]}).to_csv(
        tmp_path / "history.csv", index=False)
    result = convergence(tmp_path / "history.csv", target_loss=0.45)
    assert result["initial_loss"] == 2.0 and result["final_loss"] == pytest.approx(0.34)  # not the last batch's 0.1
    assert result["steps_to_target"] == 7 and result["final_val_loss"] == 0.5  # (0.6 + 4 × 0.4) / 5 = 0.44 at step 7


def test_label_blind_loss_is_ln2_per_record_over_its_answer_tokens():
    """'yes' (2 tokens) and 'no' (3 tokens): a model sure of the format, 50/50 on the word, loses ln 2 per record."""
    assert label_blind_loss({1: [5, 9], 0: [6, 7, 9]}, [1, 0, 0, 1]) == pytest.approx(4 * math.log(2) / 10)


def test_lm_scores_are_the_answer_log_odds_the_model_itself_computes(tiny_model_dir, inputs):
    """The LM's classification score of a record is sigmoid(log p(positive answer) − log p(negative answer)); the
    oracle takes each answer's log-probability from transformers' own loss on a batch of one."""
    from sklearn.metrics import roc_auc_score

    processor = load_processor(tiny_model_dir)
    settings = arm()
    student, _ = student_of(tiny_model_dir, settings)
    records = read_json(inputs[1])["splits"]["test"]["records"]
    batcher = VL.batcher(processor, settings)
    metrics = VL.test_metrics(student, records, batcher, 2, settings)
    log_odds, nll, tokens = [], 0.0, 0
    for record in records:
        logprob = {}
        for label in (1, 0):
            batch = {k: v for k, v in batcher([{**record, "label": label}]).items() if k not in BATCH_EXTRAS}
            with torch.no_grad():
                loss = student.model(**batch, use_cache=False).loss.item()
            count = int((batch["labels"] != -100).sum())  # the loss is the mean over the answer tokens
            logprob[label] = -loss * count
            if label == record["label"]:
                nll, tokens = nll + loss * count, tokens + count
        log_odds.append(logprob[1] - logprob[0])
    labels = [r["label"] for r in records]
    assert metrics["lm"]["classification"]["roc_auc"] == pytest.approx(roc_auc_score(labels, log_odds))
    assert metrics["lm"]["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    # the whole model's answer: its greedy words for each record's prompt and image, against the label's word
    predictions = metrics["predictions"]
    words = {1: settings.train.positive_word, 0: settings.train.negative_word}
    assert predictions["id"].tolist() == [r["image_path"] for r in records]
    assert predictions["reference"].tolist() == [words[label] for label in labels]
    pixels = {"images_kwargs": {"size": {"shortest_edge": IMAGE_SIZE ** 2, "longest_edge": IMAGE_SIZE ** 2}}}
    answer_tokens = max(len(ids) for ids in batcher.chat.answer_ids.values())  # the longer answer and end of turn
    alone = greedy_generate(student.model, processor, [batcher.chat.prompt(records[0])], answer_tokens,
                            images=[[load_image(records[0]["image_path"], IMAGE_SIZE)]], processor_kwargs=pixels)
    assert predictions["generated"][0] == alone[0]
    assert metrics["generation"]["exact_match"] == predictions["score"].mean()
