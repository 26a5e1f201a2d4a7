"""Depth models: the tiny default, loading a local checkpoint, one `predict` for both backends, and the towers
LoRA adapters can go into.

Two backends serve the same interface:

- ``transformers``: `DepthAnythingForDepthEstimation` (Depth Anything V1 / V2 ``-hf`` checkpoints, relative or
  metric). The tiny default is such a model with a tiny DINOv2 backbone, briefly pre-trained on generic scenes
  (`pretrain.py`) and written with `save_pretrained` next to a `DPTImageProcessor` config, so that it loads exactly
  like a downloaded checkpoint.
- ``vggt``: `vggt.models.vggt.VGGT` from the user-installed ``vggt`` package (not on any registry), loaded from a
  local directory holding ``model.safetensors`` (and optionally the ``config.json`` of its init arguments).

Nothing here touches a model hub.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from ...config import Section, require
from ...errors import CheckpointError, ConfigError
from ...io import atomic_path

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "vggt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGT_MISSING = ("model.backend: vggt needs the vggt package (pip install from its GitHub repository); "
                "it is not installed")

# backend -> tower -> (regex over full module names, has_blocks); with blocks, group 1 is the block index.
# transformers: DepthAnythingForDepthEstimation, whose neck leaves fusion layer 0's residual_layer1 unused (an
# adapter there would never train). vggt: VGGT (aggregator.patch_embed is its DINOv2 encoder).
DEPTH_TOWERS: dict[str, dict[str, tuple[str, bool]]] = {
    "transformers": {
        "backbone": (r"^backbone\.encoder\.layer\.(\d+)\.", True),
        "neck": (r"^neck\.(?!fusion_stage\.layers\.0\.residual_layer1\.)", False),
        "head": (r"^head\.", False),
    },
    "vggt": {
        "encoder": (r"^aggregator\.patch_embed\.blocks\.(\d+)\.", True),
        "frame": (r"^aggregator\.frame_blocks\.(\d+)\.", True),
        "global": (r"^aggregator\.global_blocks\.(\d+)\.", True),
        "depth_head": (r"^depth_head\.", False),
        "camera_head": (r"^camera_head\.", False),
        "point_head": (r"^point_head\.", False),
        "track_head": (r"^track_head\.", False),
    },
}

@dataclasses.dataclass(frozen=True)
class TinyDepthSpec(Section):
    """Sizes of the tiny Depth Anything (metric) used by the embedded default, and its generic pre-training."""

    key = "model.tiny_depth"
    seed: int = 0
    image_size: int = 56
    patch_size: int = 8
    hidden_size: int = 48
    layers: int = 4
    heads: int = 2
    neck_hidden_sizes: tuple[int, ...] = (8, 16, 32, 48)
    fusion_hidden_size: int = 16
    head_hidden_size: int = 8
    max_depth: int = 20  # metres; transformers types DepthAnythingConfig.max_depth as an int
    pretrain_steps: int = 250  # batches of generic scenes (`pretrain.pretrain_depth`); 0 leaves the weights random
    pretrain_lr: float = 1e-3

    def check(self, key: str) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "heads", "head_hidden_size", "max_depth"):
            require(getattr(self, name) >= 1, key, name, "must be at least 1")
        require(self.image_size % self.patch_size == 0, key, "image_size", "must be a multiple of patch_size")
        require(self.hidden_size % self.heads == 0, key, "hidden_size", "must be divisible by heads")
        require(self.layers >= 4, key, "layers", "must be at least 4 (the neck reads 4 of them)")
        require(len(self.neck_hidden_sizes) == 4 and min(self.neck_hidden_sizes) >= 1, key, "neck_hidden_sizes",
                "must be 4 sizes of at least 1")
        require(self.fusion_hidden_size >= 2, key, "fusion_hidden_size", "must be at least 2")
        require(self.pretrain_steps >= 0, key, "pretrain_steps", "must be at least 0")
        require(self.pretrain_lr > 0, key, "pretrain_lr", "must be positive")


def tiny_depth_config(spec: TinyDepthSpec) -> transformers.DepthAnythingConfig:
    """The tiny model's config: a DINOv2 backbone of `spec`'s sizes feeding 4 evenly spaced layers to the neck."""
    backbone = transformers.Dinov2Config(
        image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, mlp_ratio=4,
        out_indices=[spec.layers * (i + 1) // 4 for i in range(4)], reshape_hidden_states=False,
    )
    return transformers.DepthAnythingConfig(
        backbone_config=backbone, patch_size=spec.patch_size, reassemble_hidden_size=spec.hidden_size,
        neck_hidden_sizes=list(spec.neck_hidden_sizes), fusion_hidden_size=spec.fusion_hidden_size,
        head_hidden_size=spec.head_hidden_size, depth_estimation_type="metric", max_depth=spec.max_depth,
    )


def build_tiny_depth_model(out_dir: str | Path, spec: TinyDepthSpec) -> Path:
    """Write the tiny Depth Anything and its image processor into `out_dir`, atomically: random weights from
    `spec.seed`, then `spec.pretrain_steps` of generic pre-training (`pretrain.pretrain_depth`, not on the study's
    scenes) so that, like a real base, its features carry depth."""
    from .pretrain import pretrain_depth  # it imports `predict` from here

    torch.manual_seed(spec.seed)
    model = transformers.DepthAnythingForDepthEstimation(tiny_depth_config(spec))
    if spec.pretrain_steps:
        pretrain_depth(model, spec.image_size, spec.max_depth, spec.pretrain_steps, spec.pretrain_lr, spec.seed)
    processor = transformers.DPTImageProcessorPil(  # saved as "DPTImageProcessor", like a real -hf checkpoint
        size={"height": spec.image_size, "width": spec.image_size}, keep_aspect_ratio=True,
        ensure_multiple_of=spec.patch_size, do_pad=False, resample=3,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    log.info("built tiny Depth Anything with %d parameters in %s", model.num_parameters(), out_dir)
    return Path(out_dir)


def image_normalisation(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a transformers checkpoint's `preprocessor_config.json`; ImageNet's if it has none."""
    file = Path(path) / "preprocessor_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    if not config.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(config.get("image_mean", IMAGENET_MEAN)), tuple(config.get("image_std", IMAGENET_STD))


def load_depth_model(path: str | Path, dtype: str = "float32", backend: str = "transformers",
                     trust_remote_code: bool = False) -> nn.Module:
    """Load a local depth checkpoint directory (never a hub id) with the given backend."""
    _check_backend(backend)
    if backend == "vggt":
        vggt_class = _vggt_class()
        weights, kwargs = _vggt_checkpoint(path)
        try:
            model = vggt_class(**kwargs)
            model.load_state_dict(load_file(weights))
        except (TypeError, RuntimeError) as err:
            raise CheckpointError(f"{weights}: does not fit VGGT({kwargs}) ({str(err).splitlines()[0]})") from err
        return model.to(getattr(torch, dtype))
    _require_file(path, "config.json")
    try:
        return transformers.AutoModelForDepthEstimation.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({str(err).splitlines()[0]})") from err


def depth_skeleton(source: TinyDepthSpec | str | Path, backend: str = "transformers",
                   trust_remote_code: bool = False) -> nn.Module:
    """The depth model's module tree on the meta device, from its config alone (no weights read), for the
    start-up checks. Without the vggt package, a VGGT checkpoint gets `vggt_standin` at VGGT-1B's sizes."""
    _check_backend(backend)
    if isinstance(source, TinyDepthSpec):
        if backend != "transformers":
            raise ConfigError("model.backend: the tiny depth model is a transformers model")
        config = tiny_depth_config(source)
    elif backend == "vggt":
        _, kwargs = _vggt_checkpoint(source)
        with torch.device("meta"):
            if importlib.util.find_spec("vggt") is None:
                return vggt_standin(depth=24, dim=kwargs.get("embed_dim", 1024))
            return _vggt_class()(**kwargs)
    else:
        _require_file(source, "config.json")
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    try:
        with torch.device("meta"):
            return transformers.AutoModelForDepthEstimation.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{source}/config.json: cannot build a depth model ({str(err).splitlines()[0]})") from err


@dataclasses.dataclass
class DepthPrediction:
    """One forward pass: depth [B,S,H,W] (metres for a metric model), VGGT's confidence [B,S,H,W] and camera
    pose encoding [B,S,9] (absT_quaR_FoV), None where the backend has none."""

    depth: torch.Tensor
    confidence: torch.Tensor | None = None
    pose_encoding: torch.Tensor | None = None


def predict(model: nn.Module, images: torch.Tensor, backend: str = "transformers",
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> DepthPrediction:
    """Run `model` on `images` [B,S,3,H,W] in [0, 1]; outputs are float32 at the input's H x W (bilinear where the
    model's own output size differs). `mean` / `std` normalise for the transformers backend (VGGT normalises
    itself); VGGT needs H and W to be multiples of its patch size (14)."""
    _check_backend(backend)
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be [B, S, 3, H, W], got {list(images.shape)}")
    batch, views, _, height, width = images.shape
    dtype = next(model.parameters()).dtype
    if backend == "vggt":
        out = model(images.to(dtype))
        confidence = out.get("depth_conf")
        pose = out.get("pose_enc")
        return DepthPrediction(
            _resize(out["depth"][..., 0].flatten(0, 1), height, width).view(batch, views, height, width),
            None if confidence is None else _resize(confidence.flatten(0, 1), height, width).view(
                batch, views, height, width),
            None if pose is None else pose.float(),
        )
    shift = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    scale = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.flatten(0, 1) - shift) / scale).to(dtype)
    depth = model(pixel_values=pixels).predicted_depth
    return DepthPrediction(_resize(depth, height, width).view(batch, views, height, width))


def pose_encoding_from_cameras(extrinsics: torch.Tensor, intrinsics: torch.Tensor,
                               image_hw: tuple[int, int]) -> torch.Tensor:
    """VGGT's absT_quaR_FoV encoding [B,S,9] of OpenCV camera-from-world extrinsics [B,S,3,4] and intrinsics
    [B,S,3,3]: translation (3), rotation quaternion in VGGT's order x, y, z, w (scalar last, w >= 0), then
    FoV height = 2 atan(H / 2 / fy) and FoV width = 2 atan(W / 2 / fx), in radians."""
    height, width = image_hw
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    quaternion = _matrix_to_quaternion_xyzw(extrinsics[..., :3, :3])
    return torch.cat([extrinsics[..., :3, 3], quaternion, fov_h[..., None], fov_w[..., None]], dim=-1).float()


def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The individual layers PEFT LoRA can take: `nn.Linear` and `nn.Conv2d` (not ConvTranspose2d, not
    containers), with their full names."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def vggt_standin(depth: int = 4, dim: int = 32) -> nn.Module:
    """A module tree named and typed like VGGT's (facebookresearch/vggt) for strategy resolution and start-up
    checks, without the vggt package; it has no forward. At depth=24, dim=1024 its layers have VGGT-1B's shapes.

    Left out: parameter-free modules (dropouts, activations, identities, RoPE) and the track head (whose tracker
    internals were not confirmed)."""
    heads = max(1, dim // 64)
    encoder = _tree(
        patch_embed=_tree(proj=nn.Conv2d(3, dim, kernel_size=14, stride=14)),
        cls_token=nn.Parameter(torch.zeros(1, 1, dim)),
        pos_embed=nn.Parameter(torch.zeros(1, 1 + 37 * 37, dim)),
        register_tokens=nn.Parameter(torch.zeros(1, 4, dim)),
        mask_token=nn.Parameter(torch.zeros(1, dim)),
        blocks=nn.ModuleList(_standin_block(dim, heads, qk_norm=False) for _ in range(depth)),
        norm=nn.LayerNorm(dim),
    )
    aggregator = _tree(
        patch_embed=encoder,
        camera_token=nn.Parameter(torch.zeros(1, 2, 1, dim)),
        register_token=nn.Parameter(torch.zeros(1, 2, 4, dim)),
        frame_blocks=nn.ModuleList(_standin_block(dim, heads, qk_norm=True) for _ in range(depth)),
        global_blocks=nn.ModuleList(_standin_block(dim, heads, qk_norm=True) for _ in range(depth)),
    )
    wide = 2 * dim  # the heads read frame and global tokens concatenated
    camera_head = _tree(
        trunk=nn.Sequential(*(_standin_block(wide, heads, qk_norm=False) for _ in range(4))),
        token_norm=nn.LayerNorm(wide),
        trunk_norm=nn.LayerNorm(wide),
        empty_pose_tokens=nn.Parameter(torch.zeros(1, 1, 9)),
        embed_pose=nn.Linear(9, wide),
        poseLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(wide, 3 * wide)),
        adaln_norm=nn.LayerNorm(wide, elementwise_affine=False),
        pose_branch=_tree(fc1=nn.Linear(wide, wide // 2), fc2=nn.Linear(wide // 2, 9)),
    )
    return _tree(aggregator=aggregator, camera_head=camera_head,
                 depth_head=_standin_dpt_head(wide, dim, output_dim=2),
                 point_head=_standin_dpt_head(wide, dim, output_dim=4))


def _standin_block(dim: int, heads: int, qk_norm: bool) -> nn.Module:
    """VGGT's `Block`: norm1, attn.{qkv, q_norm, k_norm, proj}, ls1.gamma, norm2, mlp.{fc1, fc2}, ls2.gamma."""
    head_dim = dim // heads
    return _tree(
        norm1=nn.LayerNorm(dim),
        attn=_tree(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
                   **({"q_norm": nn.LayerNorm(head_dim), "k_norm": nn.LayerNorm(head_dim)} if qk_norm else {})),
        ls1=_tree(gamma=nn.Parameter(torch.zeros(dim))),
        norm2=nn.LayerNorm(dim),
        mlp=_tree(fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)),
        ls2=_tree(gamma=nn.Parameter(torch.zeros(dim))),
    )


def _standin_dpt_head(dim_in: int, dim: int, output_dim: int) -> nn.Module:
    """VGGT's `DPTHead`: norm, projects.N, resize_layers.N (two ConvTranspose2d, an identity, a strided Conv2d),
    scratch.layerN_rn, scratch.refinenetN.{out_conv, resConfUnit1, resConfUnit2}.convK, scratch.output_conv1/2."""
    channels = (dim // 4, dim // 2, dim, dim)  # VGGT-1B: 256, 512, 1024, 1024
    features = dim // 4

    def unit() -> nn.Module:
        return _tree(conv1=nn.Conv2d(features, features, 3, padding=1),
                     conv2=nn.Conv2d(features, features, 3, padding=1))

    def fusion(residual: bool) -> nn.Module:
        return _tree(out_conv=nn.Conv2d(features, features, 1), **({"resConfUnit1": unit()} if residual else {}),
                     resConfUnit2=unit())

    scratch = _tree(**{f"layer{i + 1}_rn": nn.Conv2d(c, features, 3, padding=1, bias=False)
                       for i, c in enumerate(channels)})
    for i in range(1, 5):
        setattr(scratch, f"refinenet{i}", fusion(residual=i != 4))
    scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
    scratch.output_conv2 = nn.Sequential(nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(32, output_dim, 1))
    return _tree(
        norm=nn.LayerNorm(dim_in),
        projects=nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in channels),
        resize_layers=nn.ModuleList([
            nn.ConvTranspose2d(channels[0], channels[0], 4, stride=4),
            nn.ConvTranspose2d(channels[1], channels[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(channels[3], channels[3], 3, stride=2, padding=1),
        ]),
        scratch=scratch,
    )


def _tree(**children: nn.Module | nn.Parameter) -> nn.Module:
    """A container module with the given named children and parameters."""
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _matrix_to_quaternion_xyzw(rotation: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (x, y, z, w), w >= 0, of rotation matrices [..., 3, 3]: of the four ways to recover the
    quaternion from the matrix, the one dividing by its largest component."""
    m00, m10, m20 = rotation[..., 0, 0], rotation[..., 1, 0], rotation[..., 2, 0]
    m01, m11, m21 = rotation[..., 0, 1], rotation[..., 1, 1], rotation[..., 2, 1]
    m02, m12, m22 = rotation[..., 0, 2], rotation[..., 1, 2], rotation[..., 2, 2]
    # 4 w^2, 4 x^2, 4 y^2, 4 z^2
    squares = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    # row k: 4 q_k * (w, x, y, z)
    products = torch.stack([
        torch.stack([squares[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, squares[..., 1], m01 + m10, m02 + m20], -1),
        torch.stack([m02 - m20, m01 + m10, squares[..., 2], m12 + m21], -1),
        torch.stack([m10 - m01, m02 + m20, m12 + m21, squares[..., 3]], -1),
    ], -2)
    best = squares.argmax(-1, keepdim=True)
    row = products.gather(-2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    wxyz = row / (2 * squares.gather(-1, best).clamp(min=1e-12).sqrt())
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)
    return wxyz[..., [1, 2, 3, 0]]


def _resize(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N,h,w] maps as float32 at height x width (bilinear where the size differs)."""
    maps = maps.float()
    if maps.shape[-2:] == (height, width):
        return maps
    return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"model.backend: {backend!r} is not one of {', '.join(map(repr, BACKENDS))}")


def _require_file(directory: str | Path, name: str) -> Path:
    """`directory/name`, or CheckpointError naming it (a local checkpoint directory is required)."""
    file = Path(directory) / name
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (model.source must be a local checkpoint directory)")
    return file


def _vggt_class() -> type:
    """`vggt.models.vggt.VGGT`, or CheckpointError saying the package is missing or broken."""
    if importlib.util.find_spec("vggt") is None:
        raise CheckpointError(VGGT_MISSING)
    try:
        from vggt.models.vggt import VGGT
    except ImportError as err:
        raise CheckpointError(f"model.backend: the vggt package cannot be imported ({err})") from err
    return VGGT


def _vggt_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(`model.safetensors`, VGGT init arguments from `config.json` if present) of a VGGT checkpoint directory;
    pickled `model.pt` checkpoints are not loaded."""
    weights = _require_file(path, "model.safetensors")
    config = Path(path) / "config.json"
    try:
        return weights, json.loads(config.read_text()) if config.is_file() else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config}: not valid JSON ({err.msg} at line {err.lineno})") from err
