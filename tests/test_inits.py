"""PEFT's orthogonal and data-driven inits: where each starts, that its adapter reloads with plain PEFT, and that its
preprocessing runs once per arm, is read back, and has its cost recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from snakemake.utils import validate
from torch import nn

from conftest import assert_reloads_to_trained, launch_data_parallel, vision_inputs
from lowrank_core import inits, lora
from lowrank_core.delta import DeltaConfig, export_delta
from lowrank_core.errors import ConfigError
from lowrank_core.grid import PRESETS, STRATEGIES
from lowrank_core.inits import check_init
from lowrank_core.io import load_tensors, read_json, write_json
from lowrank_core.lora import ArmConfig, build_student, start_student
from lowrank_core.modalities import get_modality
from lowrank_core.modalities.vision_language import BATCH_EXTRAS
from lowrank_core.modeling import load_model, load_processor

IMAGE_SIZE = 32
R = 4
VL = get_modality("vision_language")


def arm(**overrides) -> ArmConfig:
    settings = {"objective": "lm", "init": "random", "preset": {**PRESETS["standard"], "r": R, "alpha": 8},
                "strategy": STRATEGIES["later_half"], "image_size": IMAGE_SIZE, "head": {"hidden": 16},
                "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2,
                          "checkpoint_every": 2},
                "eva": {"batches": 2}, "corda": {"samples": 4}, "lora_ga": {"batches": 2}} | overrides
    return ArmConfig.from_dict(settings)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """(model_info_json, manifest_json) for the tiny model and a few synthetic images."""
    return vision_inputs(tmp_path_factory.mktemp("init_inputs"), tiny_model_dir, IMAGE_SIZE, 8, 4, 4)


def train_records(inputs) -> list[dict]:
    return read_json(inputs[1])["splits"]["train"]["records"]


def started(inputs, settings: ArmConfig, **paths):
    """(student, targets, cost) of `start_student` on a freshly loaded tiny model."""
    info = read_json(inputs[0])
    model, processor = VL.load(info)
    return start_student(info, model, processor, settings, train_records=train_records(inputs), **paths)


def model_inputs(inputs, settings: ArmConfig) -> dict[str, torch.Tensor]:
    """The test split as one batch of model inputs."""
    batch = VL.batcher(load_processor(read_json(inputs[0])["path"]), settings)(read_json(inputs[1])["splits"]["test"]
                                                                                  ["records"])
    return {k: v for k, v in batch.items() if k not in BATCH_EXTRAS}


def adapters(student, name: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(A, B, scaling, base-layer weight) of the adapted module `name`."""
    layer = student.model.get_base_model().get_submodule(name)
    return (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
            layer.scaling["default"], layer.get_base_layer().weight.detach())


# ---------------------------------------------------------------- where each starts


@pytest.mark.parametrize("init", ["orthogonal", "eva", "corda", "lora_ga"])
def test_each_init_starts_where_the_base_is(tiny_model_dir, inputs, init):
    """The merged student is the base model, weight by weight and output for output, while the adapters hold
    something: orthogonal and eva add B A = 0 to the untouched base weight; corda and lora_ga take s·B A ≠ 0 out of
    it."""
    settings = arm(init=init)
    student, targets, _ = started(inputs, settings)
    base = load_model(tiny_model_dir)
    batch = model_inputs(inputs, settings)
    with torch.no_grad():
        torch.testing.assert_close(student.eval().model(**batch).logits, base(**batch).logits, atol=1e-4, rtol=1e-4)
    taken = []  # what it took out of each weight, relative to the weight
    for name in targets:
        A, B, scaling, weight = adapters(student, name)
        original = base.get_submodule(name).weight.detach()
        torch.testing.assert_close(weight + scaling * B @ A, original, atol=2e-6, rtol=1e-5, msg=name)
        assert A.abs().max() > 0, name
        if init in ("orthogonal", "eva"):
            assert torch.equal(weight, original) and (scaling * B @ A).abs().max() < 1e-6, name
        else:
            assert torch.linalg.matrix_rank(B @ A) == R, name
            taken.append(float((original - weight).norm() / original.norm()))
    if taken:  # far above float32 rounding (~1e-7 relative). corda: in every weight (measured at least 4e-4).
        # lora_ga scales its start by the objective's gradient, which at the base's tied answer words carries no
        # label: 4e-7 and 5e-7 at lm_head and the last layer's q_proj, 5e-5 in the median weight (measured)
        assert (min(taken) if init == "corda" else float(np.median(taken))) > 1e-5, taken


def test_eva_starts_a_with_orthonormal_input_components_and_shares_out_the_rank_budget(inputs):
    """EVA's A rows are principal directions (orthonormal) of the inputs, B = 0, and the ranks it redistributes sum
    to r per target."""
    student, targets, _ = started(inputs, arm(init="eva"))
    ranks = 0
    for name in targets:
        layer = student.model.get_base_model().get_submodule(name)
        if not hasattr(layer, "lora_A"):
            continue  # EVA gave it rank 0
        A, B, _, _ = adapters(student, name)
        torch.testing.assert_close(A @ A.T, torch.eye(len(A)), atol=1e-4, rtol=0, msg=name)
        assert not B.any()
        ranks += len(A)
    assert ranks == R * len(targets)
    assert student.model.peft_config["default"].rank_pattern  # the tiny model's inputs do not all get r


def test_lora_ga_starts_a_in_the_gradients_top_right_singular_subspace(tiny_model_dir, inputs):
    """With direction ArB2r, A spans the top-r right-singular subspace of the objective's gradient averaged over the
    first batches, computed here independently of PEFT."""
    settings = arm(init="lora_ga")
    student, targets, _ = started(inputs, settings)
    model = load_model(tiny_model_dir)
    reference = VL.student(model, settings, load_processor(tiny_model_dir)).train()
    batcher, records = VL.batcher(load_processor(tiny_model_dir), settings), train_records(inputs)
    for index in range(settings.lora_ga.batches):
        reference(batcher(records[index * 2:(index + 1) * 2])).backward()
    for name in targets:
        gradient = model.get_submodule(name).weight.grad / settings.lora_ga.batches
        top = torch.linalg.svd(gradient.double(), full_matrices=False)[2][:R]
        A = adapters(student, name)[0].double()
        torch.testing.assert_close(A.T @ A, top.T @ top, atol=2e-3, rtol=0, msg=name)


# ---------------------------------------------------------------- reloading with plain PEFT


@pytest.mark.parametrize("init", ["orthogonal", "eva", "corda", "lora_ga"])
def test_trained_adapter_reloads_with_plain_peft_to_the_trained_outputs(tiny_model_dir, inputs, tmp_path, init):
    """The adapter on disk (plain LoRA of rank 2r for corda / lora_ga, with EVA's rank pattern for eva) reproduces the
    in-training model on a fresh, untouched base."""
    settings = arm(init=init)
    stats = lora.train_lora(*inputs, settings, tmp_path / "out", tmp_path / "state", tmp_path / "tb")
    assert stats["init_preprocessing"] == (None if init == "orthogonal" else "shared")
    trained, _, _ = build_student(read_json(inputs[0]), settings, train_records=train_records(inputs),
                                  init_dir=tmp_path / "state" / "init")  # the same start, read back ...
    checkpoint, _ = load_tensors(tmp_path / "state" / "checkpoint" / "step-00000004" / "weights.safetensors")
    trained.load_state_dict(checkpoint, strict=False)  # ... plus the trained adapter weights
    config = read_json(tmp_path / "out" / "adapter" / "adapter_config.json")
    assert (config["r"], config["init_lora_weights"]) == ((2 * R, True) if init in ("corda", "lora_ga") else
                                                          (R, init))
    assert_reloads_to_trained(trained, tmp_path / "out" / "adapter", tiny_model_dir, model_inputs(inputs, settings))


def test_a_killed_arm_reads_its_preprocessing_back_and_resumes_to_the_same_adapter(inputs, tmp_path, monkeypatch):
    """LoRA-GA's randomized SVD draws from the seed's RNG after the preprocessing: reading it back instead of
    computing it leaves the draws, and so the base weights the checkpoint was trained against, the same."""
    settings = arm(init="lora_ga")
    lora.train_lora(*inputs, settings, tmp_path / "whole" / "out", tmp_path / "whole" / "state", tmp_path / "tb")
    calls = {"train": 0}
    student_loss = lora.student_loss

    def dies_in_step_four(model, batch):
        calls["train"] += model.training
        if calls["train"] == 4:
            raise RuntimeError("killed")
        return student_loss(model, batch)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(lora, "student_loss", dies_in_step_four)
        with pytest.raises(RuntimeError, match="killed"):
            lora.train_lora(*inputs, settings, killed / "out", killed / "state", tmp_path / "tb")
    monkeypatch.setattr(inits, "_lora_ga", lambda *args: pytest.fail("preprocessed again"))
    assert lora.train_lora(*inputs, settings, killed / "out", killed / "state", tmp_path / "tb")[
        "resumed_from_step"] == 2
    expected, resumed = (load_file(root / "out" / "adapter" / "adapter_model.safetensors")
                         for root in (tmp_path / "whole", killed))
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_two_data_parallel_processes_start_from_one_preprocessing_and_match_one_process(inputs, tmp_path):
    """The main process preprocesses, the other reads its result: both start alike and end at the single-process
    adapter (dropout 0)."""
    settings = arm(init="corda", preset={**PRESETS["standard"], "r": R, "alpha": 8, "dropout": 0.0},
                   train={"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 2})
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    lora.train_lora(*inputs, settings, single / "out", single / "state", tmp_path / "tb")
    launch_data_parallel("lowrank_core.lora:train_lora",
                         f"{str(inputs[0])!r}, {str(inputs[1])!r}, ArmConfig.from_dict({settings.to_dict()!r}), "
                         f"{str(parallel / 'out')!r}, {str(parallel / 'state')!r}, {str(tmp_path / 'tb')!r}")
    assert read_json(parallel / "out" / "train_stats.json")["processes"] == 2
    one, two = (load_file(root / "out" / "adapter" / "adapter_model.safetensors") for root in (single, parallel))
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


# ---------------------------------------------------------------- preprocessing: shared, read back, its cost


def test_preprocessing_runs_once_for_the_arms_seeds_and_again_when_its_inputs_change(inputs, tmp_path, monkeypatch):
    calls = []
    corda = inits._corda
    monkeypatch.setattr(inits, "_corda", lambda *args: calls.append(1) or corda(*args))
    costs = [started(inputs, arm(init="corda", seed=seed), init_dir=tmp_path)[2] for seed in (0, 1)]
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == ["corda.safetensors"]
    assert costs[0]["init_preprocessing"] == "shared" and costs[0]["init_peak_memory_mb"] > 0
    assert costs[1]["init_peak_memory_mb"] == costs[0]["init_peak_memory_mb"]  # as measured when computed
    assert costs[1]["init_seconds"] >= load_tensors(tmp_path / "corda.safetensors")[1]["cost"]["seconds"] > 0
    started(inputs, arm(init="corda", corda={"samples": 3}), init_dir=tmp_path)
    assert len(calls) == 2


def test_a_fresh_head_makes_the_preprocessing_the_seeds_own(inputs, tmp_path):
    cost = started(inputs, arm(init="lora_ga", objective="head", seed=3), init_dir=tmp_path)[2]
    assert cost["init_preprocessing"] == "per seed" and [p.name for p in tmp_path.iterdir()] == [
        "lora_ga-seed3.safetensors"]


def test_the_svd_inits_cost_is_the_teachers_fine_tune_and_the_delta_export(tiny_model_dir, inputs, tmp_path):
    teacher = load_model(tiny_model_dir)
    with torch.no_grad():
        teacher.get_submodule("model.language_model.layers.3.self_attn.q_proj").weight.add_(0.05)
    teacher.save_pretrained(tmp_path / "teacher")
    write_json(tmp_path / "teacher" / "train_summary.json", {"train_seconds": 1234.0, "peak_memory_mb": 1e6})
    export_delta(tiny_model_dir, tmp_path / "teacher", tmp_path / "delta", DeltaConfig(ranks=(R,)))
    export = read_json(tmp_path / "delta" / "svd_analysis.json")["cost"]["seconds"]
    cost = started(inputs, arm(init="svd"), delta_dir=tmp_path / "delta")[2]
    assert cost["init_preprocessing"] == "teacher" and cost["init_peak_memory_mb"] == 1e6
    assert cost["init_seconds"] >= 1234.0 + export


# ---------------------------------------------------------------- settings and what cannot start


def test_schema_defaults_of_the_init_sections_agree_with_the_dataclasses():
    config = {}
    validate(config, str(Path(__file__).resolve().parents[1] / "config" / "schema.yaml"), set_default=True)
    for cls in (inits.EvaSettings, inits.CordaSettings, inits.LoraGASettings):
        assert config["lora"][cls.key.removeprefix("lora.")] == cls().to_dict(), cls.key


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ConfigError, match=r"^lora\.grid\.inits: orthogonal .* needs an even r \(the preset's is 3\)"):
        arm(init="orthogonal", preset={"r": 3})


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "lora_ga"])
def test_inits_that_change_the_base_weights_refuse_dora(init):
    """Their adapters are saved converted to plain LoRA, a conversion that leaves DoRA's magnitude out (the reloaded
    model would not be the trained one)."""
    with pytest.raises(ConfigError, match=rf"^lora\.grid\.inits: {init} takes its start out of the base weights.* "
                                          r"cannot start a preset with use_dora"):
        arm(init=init, preset={"use_dora": True})


@pytest.mark.parametrize("init", ["orthogonal", "pissa", "eva", "lora_ga"])
def test_inits_of_linear_layers_refuse_a_convolution(init):
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
    with pytest.raises(ConfigError, match=rf"^lora\.grid\.inits: {init} initialises linear layers only, but the "
                                          r"arm's strategy also targets 1 other modules \(1\)"):
        check_init(model, ["0", "1"], arm(init=init), VL, 100)
    check_init(model, ["0", "1"], arm(init="random"), VL, 100)


def test_corda_is_refused_for_depth_and_preprocessing_beyond_the_training_split_names_its_key():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"^lora\.grid\.inits: corda is not available for model\.modality depth"):
        check_init(model, ["0"], arm(init="corda"), get_modality("depth"), 100)
    with pytest.raises(ConfigError, match=r"^lora\.eva\.batches: eva preprocessing reads 8 training records, more "
                                          r"than the 7 there are"):
        check_init(model, ["0"], arm(init="eva", eva={"batches": 4}), VL, 7)
