"""The depth modality: a depth model (Depth Anything / DPT through transformers, or VGGT) fine-tuned on sequences of
ETH3D-format multi-view frames, scored by depth metrics against the projected COLMAP points (and laser depth).

One objective, `depth` (`losses.depth_loss`), for the teacher, the references and every arm; strategies A / B / C
choose the towers (`models.DEPTH_TOWERS`) adapters go in, resolved to individual Linear / Conv2d layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...data import DatasetConfig
from ...errors import CheckpointError, DataError
from ...io import write_json
from ...targets import Family, Tower
from ..base import Modality
from . import eth3d, synthetic
from .losses import depth_loss
from .metrics import DEPTH_METRICS, depth_metrics
from .models import (DEPTH_TOWERS, DepthPrediction, TinyDepthSpec, build_tiny_depth_model, depth_skeleton,
                     image_normalisation, load_depth_model, pose_encoding_from_cameras, predict)

EXAMPLE_FRAMES = 2  # test frames whose prediction an evaluation keeps for the report's figure
_DINO_ALIASES = {"query": frozenset({"q_proj"}), "key": frozenset({"k_proj"}), "value": frozenset({"v_proj"}),
                 "dense": frozenset({"o_proj"}), "fc1": frozenset({"up_proj"}), "fc2": frozenset({"down_proj"}),
                 "qkv": frozenset({"q_proj", "k_proj", "v_proj"}), "proj": frozenset({"o_proj"})}


@dataclasses.dataclass(frozen=True)
class DepthInputs:
    """How frames become model inputs: the backend and its normalisation (the 'processor' of a depth model), and
    the image processor a transformers checkpoint carries (saved with the teacher)."""

    backend: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_processor: object | None = None

    def save_pretrained(self, out_dir: str | Path) -> None:
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out_dir)


class DepthStudent(nn.Module):
    """A depth model (PEFT-wrapped for an arm); `forward(batch)` is the depth loss. Batches with too few valid
    pixels contribute no gradient and are counted in `skipped` (while training)."""

    def __init__(self, model: nn.Module, arm, inputs: DepthInputs):
        super().__init__()
        self.model, self.arm, self.inputs = model, arm, inputs
        self.skipped = 0

    def outputs(self, batch: dict[str, torch.Tensor]) -> DepthPrediction:
        return predict(self.model, batch["images"], self.inputs.backend, self.inputs.mean, self.inputs.std)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(batch, self.outputs(batch))

    def loss(self, batch: dict[str, torch.Tensor], prediction: DepthPrediction) -> torch.Tensor:
        """The depth loss of `prediction` for `batch`."""
        target_pose = None
        if prediction.pose_encoding is not None:
            target_pose = pose_encoding_from_cameras(batch["extrinsics"], batch["intrinsics"],
                                                     tuple(batch["images"].shape[-2:]))
        result = depth_loss(prediction.depth, batch["depth"], batch["valid"], prediction.confidence,
                            prediction.pose_encoding, target_pose, self.arm.depth.loss)
        if result.skipped and self.training:
            self.skipped += 1
        return result.loss


def collate_windows(records: list[dict]) -> dict[str, torch.Tensor]:
    """Sequence records (each with the frame size and depth range it was prepared for) as [B, S, ...] batches."""
    windows = [eth3d.load_window(record, tuple(record["image_size"]), tuple(record["depth_range"]))
               for record in records]
    return {key: torch.stack([w[key] for w in windows]) for key in windows[0]}


class Depth(Modality):
    name = "depth"

    def check_source(self, dataset: DatasetConfig) -> None:
        if dataset.source == "synthetic":
            return
        root = Path(dataset.source)
        if not root.is_dir():
            raise DataError(f"dataset.source: {root} is not a directory (of ETH3D scenes, or 'synthetic')")
        for scene in dataset.eth3d.scenes:
            if not (root / scene).is_dir():
                raise DataError(f"dataset.eth3d.scenes: {root / scene} does not exist")

    def train_records(self, dataset: DatasetConfig) -> int:
        cfg, spec = dataset.eth3d, dataset.synthetic_scenes
        if dataset.source == "synthetic":
            names = [[f"{i:04d}" for i in range(spec.images_per_scene)]] * spec.scenes
        else:
            names = [[view.name for view in eth3d.read_scene(scene).views]
                     for scene in eth3d.scene_dirs(dataset.source, cfg)]
        return sum(len(eth3d.split_scene(scene_names, cfg)["train"]) for scene_names in names)

    def prepare_dataset(self, dataset: DatasetConfig, synthetic_dir, out_manifest) -> dict:
        cfg = dataset.eth3d
        root = synthetic_dir if dataset.source == "synthetic" else dataset.source
        manifest = eth3d.prepare_eth3d(root, cfg)
        for split in manifest["splits"].values():
            split["records"] = [{**record, "image_size": list(cfg.image_size), "depth_range": list(cfg.depth_range)}
                                for record in split["records"]]
        write_json(out_manifest, {**manifest, "source": dataset.source, "modality": self.name})
        return manifest

    def generate_synthetic(self, out_dir, spec: dict) -> None:
        synthetic.generate_synthetic_eth3d(out_dir, synthetic.SyntheticScenesSpec.from_dict(spec))

    def record_id(self, record: dict) -> str:
        return record["id"]

    def build_tiny(self, out_dir, spec: dict) -> None:
        build_tiny_depth_model(out_dir, TinyDepthSpec.from_dict(spec))

    def family(self, backend: str) -> Family:
        towers = {name: Tower(pattern, blocks, _DINO_ALIASES if blocks else {})
                  for name, (pattern, blocks) in DEPTH_TOWERS[backend].items()}
        return Family(towers, adaptable=(nn.Linear, nn.Conv2d))

    def active_towers(self, objective: str) -> set[str]:
        return {name for towers in DEPTH_TOWERS.values() for name in towers}

    def check_checkpoint(self, config: dict, config_file: Path) -> None:
        if "vision_config" in config or "text_config" in config:
            raise CheckpointError(f"{config_file}: a (vision-)language model, but model.modality is depth")

    def load(self, info: dict) -> tuple[nn.Module, DepthInputs]:
        backend = info.get("backend", "transformers")
        model = load_depth_model(info["path"], info["dtype"], backend, info.get("trust_remote_code", False))
        processor = None
        if backend == "transformers" and (Path(info["path"]) / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(info["path"])
        return model, DepthInputs(backend, *image_normalisation(info["path"]), processor)

    def skeleton(self, cfg) -> nn.Module:
        source = cfg.tiny_depth if cfg.source == "tiny" else cfg.source
        return depth_skeleton(source, cfg.backend, cfg.trust_remote_code)

    def student(self, model: nn.Module, arm, processor: DepthInputs, head_path=None, arm_dir=None) -> DepthStudent:
        return DepthStudent(model, arm, processor)

    def batcher(self, processor, arm):
        return collate_windows

    @torch.no_grad()
    def test_metrics(self, student: DepthStudent, records: list[dict], batcher, batch_size: int, arm) -> dict:
        """Depth metrics per frame, averaged, against the projected points (valid for evaluation) and, where the
        scenes have it, the laser depth; the test loss; the first frames' predictions for the report."""
        student.eval()
        predictions, targets, losses, examples = [], [], [], []
        for start in tqdm(range(0, len(records), batch_size), desc="evaluate", unit="batch"):
            batch = batcher(records[start:start + batch_size])
            prediction = student.outputs(batch)
            losses.append(float(student.loss(batch, prediction)))
            predictions.append(prediction.depth.flatten(0, 1))
            targets.append({key: batch[key].flatten(0, 1) for key in ("images", "depth", "eval_valid", "laser",
                                                                         "laser_valid")})
        depth = torch.cat(predictions)
        target = {key: torch.cat([t[key] for t in targets]) for key in targets[0]}
        result = {"depth": depth_metrics(depth, target["depth"], target["eval_valid"], arm.depth.alignment),
                  "laser": None, "test_loss": sum(losses) / len(losses), "frames": len(depth),
                  "alignment": arm.depth.alignment}
        if target["laser_valid"].any():
            result["laser"] = depth_metrics(depth, target["laser"], target["laser_valid"], arm.depth.alignment)
        for i in range(min(EXAMPLE_FRAMES, len(depth))):
            examples.append({"image": target["images"][i].tolist(), "pred": depth[i].tolist(),
                             "gt": (target["laser"] if target["laser_valid"][i].any() else target["depth"])[i].tolist(),
                             "valid": (target["laser_valid"] if target["laser_valid"][i].any()
                                       else target["eval_valid"])[i].tolist()})
        result["examples"] = examples
        return result

    def dataset_section(self, manifest: dict):
        from .report import dataset_section

        return dataset_section(manifest)

    def result_sections(self, inputs: dict) -> list:
        from .report import results_section

        return [results_section(inputs)] if "lora_table" in inputs else []

    def table_row(self, metrics: dict) -> dict:
        row = {"source": "points", **{name: metrics["depth"].get(name) for name in DEPTH_METRICS}}
        laser = metrics.get("laser") or {}
        return row | {f"laser_{name}": laser.get(name) for name in DEPTH_METRICS} | {"test_loss": metrics["test_loss"]}

    def train_counters(self, student: DepthStudent) -> dict:
        return {"skipped_batches": student.skipped}


MODALITY = Depth()
