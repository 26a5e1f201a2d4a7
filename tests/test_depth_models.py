"""Depth models: the tiny Depth Anything round trip, predict, towers and strategies, VGGT loading and its pose
encoding."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn

from lowrank_core.errors import CheckpointError, ConfigError
from lowrank_core.grid import DEPTH_STRATEGIES
from lowrank_core.lora import PresetConfig
from lowrank_core.modalities import get_modality
from lowrank_core.targets import StrategyConfig, resolve_targets
from lowrank_core.modalities.depth.models import (
    DEPTH_TOWERS, IMAGENET_MEAN, IMAGENET_STD, VGGT_MISSING, TinyDepthSpec, adaptable_modules,
    build_tiny_depth_model, depth_skeleton, image_normalisation, load_depth_model, pose_encoding_from_cameras,
    predict, vggt_standin,
)

torch.set_num_threads(1)
DEPTH = get_modality("depth")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_depth_model(tmp_path_factory.mktemp("depth") / "tiny", TinyDepthSpec(pretrain_steps=0))


def resolve(model: nn.Module, backend: str, strategy: dict) -> set[str]:
    """The module names the workflow's own resolution gives `strategy` (attention and MLP kinds in the blocks)."""
    preset = PresetConfig(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    return set(resolve_targets(model, preset, StrategyConfig.from_dict(strategy), DEPTH.active_towers("depth"),
                               family=DEPTH.family(backend)))


def test_tiny_model_reloads_and_predicts_metric_depth_at_the_input_size(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = load_depth_model(tiny_dir)
    assert type(model).__name__ == "DepthAnythingForDepthEstimation"
    assert model.config.depth_estimation_type == "metric"
    spec = TinyDepthSpec()
    for size in ((56, 56), (50, 60)):  # 50 x 60 is not a multiple of the patch size: the output is resized
        out = predict(model, torch.rand(2, 3, 3, *size), "transformers", *image_normalisation(tiny_dir))
        assert out.depth.shape == (2, 3, *size) and out.depth.dtype == torch.float32
        assert (out.depth > 0).all() and (out.depth <= spec.max_depth).all()
        assert out.confidence is None and out.pose_encoding is None


def test_processor_reloads_without_torchvision(tiny_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_dir)
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__name__ == "DPTImageProcessorPil"
    pixels = processor(Image.new("RGB", (56, 56), (255, 0, 128)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 56, 56)
    assert image_normalisation(tiny_dir) == (IMAGENET_MEAN, IMAGENET_STD)
    assert pixels[0, 0, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], abs=1e-3)


def test_a_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere/config\.json: missing"):
        load_depth_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="model.backend"):
        load_depth_model(tmp_path, backend="onnx")


def test_bad_sizes_name_their_key():
    with pytest.raises(ConfigError, match=r"^model\.tiny_depth\.hidden_size: must be divisible by heads"):
        TinyDepthSpec.from_dict({"hidden_size": 50, "heads": 4})
    with pytest.raises(ConfigError, match=r"^model\.tiny_depth\.image_size: must be a multiple of patch_size"):
        TinyDepthSpec.from_dict({"image_size": 60})
    with pytest.raises(ConfigError, match=r"^model\.tiny_depth\.neck_hidden_sizes"):
        TinyDepthSpec.from_dict({"neck_hidden_sizes": [8, 16]})


def test_skeleton_has_the_built_models_tree_on_meta(tiny_dir):
    names = [name for name, _ in adaptable_modules(load_depth_model(tiny_dir))]
    for source in (TinyDepthSpec(), tiny_dir):
        skeleton = depth_skeleton(source)
        assert {p.device.type for p in skeleton.parameters()} == {"meta"}
        assert [name for name, _ in adaptable_modules(skeleton)] == names


@pytest.mark.parametrize("backend", ["transformers", "vggt"])
def test_each_adaptable_module_is_in_at_most_one_tower_and_none_is_a_transposed_conv(tiny_dir, backend):
    model = load_depth_model(tiny_dir) if backend == "transformers" else vggt_standin()
    modules = adaptable_modules(model)
    assert modules and not any(isinstance(m, nn.ConvTranspose2d) for _, m in modules)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())  # there are some, and they are left out
    towers = {tower: re.compile(pattern) for tower, (pattern, _) in DEPTH_TOWERS[backend].items()}
    for name, _ in modules:
        assert sum(bool(regex.match(name)) for regex in towers.values()) <= 1, name
    assert all(any(regex.match(name) for name, _ in modules) for tower, regex in towers.items()
               if tower != "track_head"), "a tower matches nothing"


@pytest.mark.parametrize("backend", ["transformers", "vggt"])
def test_strategies_select_increasing_sets(tiny_dir, backend):
    model = load_depth_model(tiny_dir) if backend == "transformers" else vggt_standin()
    head_only, later_half, everything = (resolve(model, backend, DEPTH_STRATEGIES[backend][name])
                                         for name in ("head_only", "later_half", "all"))
    assert head_only and head_only < later_half < everything
    blocks = "backbone.encoder.layer" if backend == "transformers" else "aggregator.frame_blocks"
    assert {int(n.split(".")[3 if backend == "transformers" else 2]) for n in later_half if n.startswith(blocks)} \
        == {2, 3}


@pytest.mark.parametrize("strategy", ["head_only", "later_half", "all"])
def test_peft_takes_the_resolved_lists(tiny_dir, strategy):
    model = load_depth_model(tiny_dir)
    targets = sorted(resolve(model, "transformers", DEPTH_STRATEGIES["transformers"][strategy]))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    wrapped = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}
    assert wrapped == set(targets)
    depth = predict(peft_model, torch.rand(1, 8, 3, 56, 56)).depth
    depth.mean().backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_peft_takes_the_vggt_standin():
    model = vggt_standin()
    targets = sorted(resolve(model, "vggt", DEPTH_STRATEGIES["vggt"]["all"]))
    get_peft_model(model, LoraConfig(r=2, target_modules=targets))


def test_vggt_without_its_package_is_one_clear_line(tmp_path):
    if importlib.util.find_spec("vggt") is not None:
        pytest.skip("the vggt package is installed")
    with pytest.raises(CheckpointError) as caught:
        load_depth_model(tmp_path, backend="vggt")
    assert str(caught.value) == VGGT_MISSING and "\n" not in VGGT_MISSING
    (tmp_path / "model.safetensors").write_bytes(b"")
    skeleton = depth_skeleton(tmp_path, "vggt")  # the stand-in at VGGT-1B's sizes
    assert len(skeleton.aggregator.frame_blocks) == 24
    assert skeleton.aggregator.frame_blocks[0].attn.qkv.in_features == 1024


def test_predict_maps_vggts_outputs():
    class FakeVGGT(nn.Module):
        """VGGT's output names and shapes, at half the input resolution."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, images):
            batch, views, _, height, width = images.shape
            depth = self.scale * images.mean(2)[..., ::2, ::2]
            return {"depth": depth[..., None], "depth_conf": 1 + depth.exp(), "pose_enc": torch.zeros(batch, views, 9)}

    out = predict(FakeVGGT(), torch.rand(2, 3, 3, 28, 42), "vggt")
    assert out.depth.shape == out.confidence.shape == (2, 3, 28, 42) and out.pose_encoding.shape == (2, 3, 9)
    assert (out.confidence > 1).all()


def test_vggt_standin_names_are_vggts():
    pytest.importorskip("vggt", reason="the vggt package (installed by hand from its GitHub repository) is absent")
    from vggt.models.vggt import VGGT

    with torch.device("meta"):
        real = {name: type(m) for name, m in adaptable_modules(VGGT())}
        standin = {name: type(m) for name, m in adaptable_modules(vggt_standin(24, 1024))}
    assert standin.items() <= real.items()


def test_pose_encoding_follows_vggt():
    extrinsics = torch.eye(3, 4).expand(2, 3, 3, 4).clone()
    intrinsics = torch.tensor([[50.0, 0, 30], [0, 40, 20], [0, 0, 1]]).expand(2, 3, 3, 3)
    encoding = pose_encoding_from_cameras(extrinsics, intrinsics, (40, 60))
    assert encoding.shape == (2, 3, 9)
    expected = [0, 0, 0, 0, 0, 0, 1, 2 * math.atan(20 / 40), 2 * math.atan(30 / 50)]  # T, quaternion x y z w, FoV h, w
    assert torch.allclose(encoding, torch.tensor(expected).expand(2, 3, 9), atol=1e-6)

    angle = torch.tensor(2.0)  # about z, and a translation that passes through
    c, s = torch.cos(angle), torch.sin(angle)
    extrinsics[0, 0, :3, :3] = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    extrinsics[0, 0, :3, 3] = torch.tensor([1.0, -2.0, 3.0])
    encoding = pose_encoding_from_cameras(extrinsics, intrinsics, (40, 60))
    expected = torch.tensor([1.0, -2.0, 3.0, 0, 0, math.sin(1.0), math.cos(1.0)])
    assert torch.allclose(encoding[0, 0, :7], expected, atol=1e-6)
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))  # w = 0: the division picks another component
    extrinsics[0, 0, :3, :3] = half_turn
    assert torch.allclose(pose_encoding_from_cameras(extrinsics, intrinsics, (40, 60))[0, 0, 3:7],
                          torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-6)
