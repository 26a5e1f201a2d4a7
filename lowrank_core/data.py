"""Tamper-detection datasets: the annotation formats, their validator, and the synthetic default generator.

Annotation format: one JSON list per split of records, of the kind the model's modality takes.

* vision-language (the forgery pipelines'): ``{"image_path": str, "label": 1 (tampered) | 0 (real),
  "mask_path": "<png>" | "HxW" | null}``, where "HxW" (e.g. "64x64") stands for an all-zero mask and relative
  paths are relative to the annotation file. A tampered image without a mask is allowed (a warning): later stages
  use it for classification only.
* text: ``{"text": "<passage>", "label": 1 (tampered / positive) | 0 (real / negative)}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from .config import Section, require
from .errors import DataError
from .io import atomic_path, write_json
from .modalities import INFO
from .modalities.depth.eth3d import Eth3dConfig
from .modalities.depth.synthetic import SyntheticScenesSpec
from .modalities.instruct.synthetic import SyntheticInstructionSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_ZERO_MASK = re.compile(r"^(\d+)x(\d+)$")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec(Section):
    """Sizes of the synthetic splice / copy-move dataset."""

    key = "dataset.synthetic"
    seed: int = 0
    image_size: int = 64
    train: int = 320
    val: int = 64
    test: int = 96
    splice_fraction: float = 0.5
    camera_noise: tuple[float, ...] = (3.0, 24.0)  # every image's sensor-noise std (of 255), uniform in this range
    region_noise_gap: float = 20.0  # a tampered region's noise std differs from its image's by this much

    def check(self, key: str) -> None:
        require(self.image_size >= 32, key, "image_size", "must be at least 32")
        for split in SPLITS:
            require(getattr(self, split) >= 2, key, split, "must be at least 2 (one real, one tampered)")
        require(0.0 <= self.splice_fraction <= 1.0, key, "splice_fraction", "must be in [0, 1]")
        require(len(self.camera_noise) == 2 and 0 <= self.camera_noise[0] <= self.camera_noise[1], key,
                "camera_noise", "must be two noise levels, low then high, neither negative")
        require(self.region_noise_gap > 0, key, "region_noise_gap", "must be positive")


@dataclasses.dataclass(frozen=True)
class DatasetConfig(Section):
    """Where the data comes from: `synthetic`, or a directory holding one annotation file per split."""

    key = "dataset"
    source: str = "synthetic"
    splits: dict[str, str] = dataclasses.field(
        default_factory=lambda: {split: f"{split}.json" for split in SPLITS})
    synthetic: SyntheticSpec = SyntheticSpec()
    eth3d: Eth3dConfig = Eth3dConfig()  # the depth modality's
    synthetic_scenes: SyntheticScenesSpec = SyntheticScenesSpec()
    synthetic_instructions: SyntheticInstructionSpec = SyntheticInstructionSpec()  # the instruct modality's

    def check(self, key: str) -> None:
        require(set(self.splits) == set(SPLITS), key, "splits", f"must name exactly {', '.join(SPLITS)}")

    def annotation_files(self, synthetic_dir: str | Path) -> dict[str, Path]:
        root = Path(synthetic_dir if self.source == "synthetic" else self.source)
        return {split: root / self.splits[split] for split in SPLITS}


# ---------------------------------------------------------------- synthetic generator


def generate_synthetic(out_dir: str | Path, spec: SyntheticSpec) -> dict[str, Path]:
    """Write deterministic train/val/test splits of real and tampered images with their masks.

    Every image is a smooth scene with a few objects, taken with a camera whose sensor noise is drawn from
    `camera_noise`, real and tampered alike, so how grainy an image is says little about its label (`test_data`).
    Tampered ones carry a region that is either spliced from another scene (blurred, then noised) or copy-moved
    within the image and resampled, its sensor noise `region_noise_gap` away from the rest of the image's: that
    inconsistency is the cue a detector has to learn.
    """
    with atomic_path(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        files = {}
        for split_index, split in enumerate(SPLITS):
            records = []
            for i in range(getattr(spec, split)):
                rng = np.random.default_rng([spec.seed, split_index, i])
                name = f"{split}_{i:05d}"
                image, mask, method = _synthetic_sample(rng, spec, tampered=i % 2 == 1)
                image.save(tmp / "images" / f"{name}.png")
                record = {"image_path": f"images/{name}.png", "label": int(mask is not None), "method": method}
                if mask is None:
                    record["mask_path"] = f"{spec.image_size}x{spec.image_size}"
                else:
                    mask.save(tmp / "masks" / f"{name}.png")
                    record["mask_path"] = f"masks/{name}.png"
                records.append(record)
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
            files[split] = Path(out_dir) / f"{split}.json"
    return files


def _synthetic_sample(rng: np.random.Generator, spec: SyntheticSpec, tampered: bool):
    size = spec.image_size
    noise = float(rng.uniform(*spec.camera_noise))
    picture = scene(rng, size, 0.0).astype(np.float32)
    image = np.clip(picture + rng.normal(0, noise, picture.shape), 0, 255).astype(np.uint8)
    if not tampered:
        return Image.fromarray(image), None, "real"
    cleaner = noise >= spec.region_noise_gap and rng.random() < 0.5  # cleaner than the image where noise allows
    region_noise = noise - spec.region_noise_gap if cleaner else noise + spec.region_noise_gap
    mask = region_mask(rng, size)
    if rng.random() < spec.splice_fraction:
        donor = Image.fromarray(scene(rng, size, noise=0.0)).filter(ImageFilter.GaussianBlur(1.5))
        method = "splice"
    else:  # the scene's own content (before its sensor noise), moved and resampled
        shift = rng.integers(size // 6, size // 3, 2) * rng.choice([-1, 1], 2)
        moved = np.roll(picture.astype(np.uint8), tuple(shift), axis=(0, 1))
        donor = Image.fromarray(moved).resize((size * 5 // 4,) * 2, Image.BICUBIC).crop((0, 0, size, size))
        method = "copy_move"
    patch = np.asarray(donor, dtype=np.float32) + rng.normal(0, region_noise, (size, size, 3))
    inside = np.asarray(mask, dtype=bool)[..., None]
    tampered_image = np.where(inside, np.clip(patch, 0, 255), image).astype(np.uint8)
    return Image.fromarray(tampered_image), mask, method


def scene(rng: np.random.Generator, size: int, noise: float) -> np.ndarray:
    """A smooth random background with a few soft objects, plus Gaussian sensor noise."""
    coarse = rng.integers(30, 225, (4, 4, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(2, 5)):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=color)
    picture = picture.filter(ImageFilter.GaussianBlur(0.8))
    pixels = np.asarray(picture, dtype=np.float32) + rng.normal(0, noise, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def region_mask(rng: np.random.Generator, size: int) -> Image.Image:
    """A rectangle or ellipse covering roughly 10-40% of the image, as an L-mode 0/255 mask.

    Large enough that the tiny model's 64 vision tokens carry the cue through its language model within the default
    teacher budget (at 6-20% its full fine-tune learned only the answer format)."""
    w, h = rng.integers(size * 3 // 8, size * 5 // 8, 2)
    x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
    mask = Image.new("L", (size, size), 0)
    shape = ImageDraw.Draw(mask).ellipse if rng.random() < 0.5 else ImageDraw.Draw(mask).rectangle
    shape((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=255)
    return mask


# ---------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class RecordKind:
    """The records a model modality takes: `key` names a record (no two records may share it)."""

    key: str
    noun: str
    form: str


RECORD_KINDS = {
    "vision_language": RecordKind("image_path", "images", '{"image_path": ..., "label": 0|1, "mask_path": ...}'),
    "text": RecordKind("text", "texts", '{"text": ..., "label": 0|1}'),
}


def validate_dataset(annotation_files: dict[str, str | Path], modality: str = "vision_language") -> dict:
    """Check every record of every split and return the manifest (resolved paths, counts, warnings).

    `modality` (model.modality) picks the record kind: image records for `vision_language`, text records for
    `text`. Errors (DataError naming the file): unreadable annotation file, record of the wrong form or kind,
    label not 0/1, missing or unreadable image, unreadable mask or one whose size differs from its image, empty or
    non-string text, empty split, an image or text listed twice (within or across splits).
    """
    key = RECORD_KINDS[modality].key
    manifest = {"splits": {}, "warnings": []}
    seen: dict[str, str] = {}
    for split in SPLITS:
        path = Path(annotation_files[split])
        records = [_validate_record(record, i, path, modality, manifest["warnings"])
                   for i, record in enumerate(read_records(path))]
        if not records:
            raise DataError(f"{path}: split '{split}' is empty")
        for record in records:
            if record[key] in seen:
                raise DataError(f"{path}: {_describe(record)} is listed twice (also in split '{seen[record[key]]}')")
            seen[record[key]] = split
        manifest["splits"][split] = {
            "annotation_file": str(path.resolve()),
            "count": len(records),
            "tampered": sum(r["label"] for r in records),
            "real": sum(1 - r["label"] for r in records),
            "with_mask": sum(r.get("mask_path") is not None for r in records),
            "records": records,
        }
    for warning in manifest["warnings"]:
        log.warning(warning)
    return manifest


def _describe(record: dict) -> str:
    """A record in one line: its image path, or the start of its text."""
    if "image_path" in record:
        return f"image {record['image_path']}"
    text = record["text"]
    return f"text {text if len(text) <= 60 else text[:57] + '...'!r}"


def read_records(path: Path) -> list:
    """The list of records in annotation file `path` (DataError naming it if there is none)."""
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: must hold a JSON list of records, got {type(records).__name__}")
    return records


def _validate_record(record, index: int, path: Path, modality: str, warnings: list[str]) -> dict:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object, got {type(record).__name__}")
    kind = RECORD_KINDS[modality]
    foreign = [other.key for other in RECORD_KINDS.values() if other.key in record]
    if kind.key not in record and foreign:
        raise DataError(f"{where}: has '{foreign[0]}' but no '{kind.key}': model.modality is {modality}, "
                        f"whose records are {kind.form}")
    if modality == "text":
        return _validate_text_record(record, where)
    return _validate_image_record(record, where, path, warnings)


def _label(record: dict, where: str) -> int:
    label = record.get("label")
    if type(label) is not int or label not in (0, 1):
        raise DataError(f"{where}: 'label' must be 0 (real) or 1 (tampered), got {label!r}")
    return label


def _validate_text_record(record: dict, where: str) -> dict:
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    return {"text": text, "label": _label(record, where)}


def _validate_image_record(record: dict, where: str, path: Path, warnings: list[str]) -> dict:
    if not isinstance(record.get("image_path"), str):
        raise DataError(f"{where}: 'image_path' must be a string")
    label = _label(record, where)
    image_path = (path.parent / record["image_path"]).resolve()
    width, height = _image_size(image_path, f"{where}: image")
    mask_path = record.get("mask_path")
    if mask_path is None:
        if label == 1:
            warnings.append(f"{where}: tampered image {image_path.name} has no mask; "
                            "used for classification only")
        else:
            mask_path = f"{height}x{width}"
    elif not isinstance(mask_path, str):
        raise DataError(f"{where}: 'mask_path' must be a mask file, \"HxW\" or null, got {mask_path!r}")
    elif match := _ZERO_MASK.match(mask_path):
        if (int(match[1]), int(match[2])) != (height, width):
            raise DataError(f"{where}: mask size {mask_path} does not match image size {height}x{width}")
    else:
        mask_file = (path.parent / mask_path).resolve()
        if not mask_file.is_file():
            raise DataError(f"{where}: 'mask_path' {mask_path!r} is neither \"HxW\" nor an existing file "
                            f"({mask_file})")
        if _image_size(mask_file, f"{where}: mask") != (width, height):
            raise DataError(f"{where}: mask {mask_file} size does not match image {image_path} ({height}x{width})")
        mask_path = str(mask_file)
    return {"image_path": str(image_path), "label": label, "mask_path": mask_path, "height": height, "width": width}


def _image_size(path: Path, what: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            image.verify()
            return image.size
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{what} {path} is unreadable ({err})") from None


def load_image(path: str, size: int) -> Image.Image:
    """An RGB image resized to `size` x `size`."""
    with Image.open(path) as image:
        return image.convert("RGB").resize((size, size), Image.BICUBIC)


def load_mask(mask_path: str | None, size: int) -> np.ndarray | None:
    """A float mask in [0, 1] of shape [size, size]; None when the record has no mask."""
    if mask_path is None:
        return None
    if _ZERO_MASK.match(mask_path):
        return np.zeros((size, size), dtype=np.float32)
    with Image.open(mask_path) as mask:
        resized = mask.convert("L").resize((size, size), Image.BILINEAR)
    return (np.asarray(resized, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)


def check_source(cfg: DatasetConfig, modality: str) -> None:
    """The source gives records of `modality`'s kind and its annotation files exist (errors name the key)."""
    if cfg.source == "synthetic":
        if INFO[modality].synthetic is None:
            raise DataError(f"dataset.source: the synthetic dataset is images, but model.modality is {modality}: "
                            f"point dataset.source at a directory of {RECORD_KINDS[modality].form} records")
        return
    if not Path(cfg.source).is_dir():
        raise DataError(f"dataset.source: {cfg.source} is not a directory (of annotation files, or 'synthetic')")
    for split, name in cfg.splits.items():
        if not (Path(cfg.source) / name).is_file():
            raise DataError(f"dataset.splits.{split}: {Path(cfg.source) / name} does not exist")


def prepare_dataset(cfg: DatasetConfig, synthetic_dir: str | Path | None, out_manifest: str | Path,
                    modality: str = "vision_language") -> dict:
    """Validate the configured annotations (records of `modality`'s kind) and write the manifest."""
    check_source(cfg, modality)
    manifest = validate_dataset(cfg.annotation_files(synthetic_dir or ""), modality)
    write_json(out_manifest, {**manifest, "source": cfg.source, "modality": modality})
    for split, info in manifest["splits"].items():
        log.info("%s: %d %s (%d tampered, %d with mask)", split, info["count"], RECORD_KINDS[modality].noun,
                 info["tampered"], info["with_mask"])
    return manifest
