"""The synthetic generator and the annotation validator."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowrank_core.data import SPLITS, SyntheticSpec, generate_synthetic, load_mask, validate_dataset
from lowrank_core.errors import DataError

SMALL = SyntheticSpec(train=6, val=4, test=4, image_size=32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic(out, SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(synthetic, tmp_path):
    generate_synthetic(tmp_path / "again", SMALL)
    generate_synthetic(tmp_path / "other", SyntheticSpec(**{**SMALL.to_dict(), "seed": 1}))
    assert _files(synthetic) == _files(tmp_path / "again")
    assert _files(synthetic) != _files(tmp_path / "other")


def test_masks_agree_with_labels(synthetic):
    manifest = validate_dataset({split: synthetic / f"{split}.json" for split in SPLITS})
    methods = set()
    for split in SPLITS:
        records = json.loads((synthetic / f"{split}.json").read_text())
        methods |= {r["method"] for r in records}
        info = manifest["splits"][split]
        assert info["count"] == getattr(SMALL, split) and info["tampered"] == info["real"]
        for record in info["records"]:
            mask = load_mask(record["mask_path"], SMALL.image_size)
            if record["label"] == 0:
                assert record["mask_path"] == "32x32" and mask.sum() == 0
            else:
                assert record["mask_path"].endswith(".png") and 0.03 < mask.mean() < 0.35
                tampered = np.asarray(Image.open(record["image_path"]), dtype=np.float32)
                inside = tampered[mask > 0.5]
                outside = tampered[mask < 0.5]
                # the forensic cue: the tampered region's local noise differs from the rest of the image
                assert np.abs(np.diff(inside, axis=0)).mean() != pytest.approx(np.abs(np.diff(outside, axis=0)).mean(),
                                                                                rel=0.1)
    assert methods == {"real", "splice", "copy_move"}


def _write_split_files(root: Path, records_by_split: dict[str, list]) -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        files[split] = root / f"{split}.json"
        files[split].write_text(json.dumps(records_by_split[split]))
    return files


@pytest.fixture
def user_dataset(tmp_path):
    """A valid user dataset: one real and one tampered image per split, with PNG masks."""
    (tmp_path / "img").mkdir()
    records = {}
    for split in SPLITS:
        records[split] = []
        for label in (0, 1):
            name = f"img/{split}_{label}.png"
            Image.new("RGB", (20, 16), (label * 200, 50, 50)).save(tmp_path / name)
            record = {"image_path": name, "label": label, "mask_path": "16x20"}
            if label:
                Image.new("L", (20, 16), 255).save(tmp_path / f"img/{split}_mask.png")
                record["mask_path"] = f"img/{split}_mask.png"
            records[split].append(record)
    return tmp_path, records


def test_valid_user_dataset_gives_manifest(user_dataset):
    root, records = user_dataset
    manifest = validate_dataset(_write_split_files(root, records))
    assert manifest["warnings"] == []
    record = manifest["splits"]["train"]["records"][1]
    assert Path(record["image_path"]).is_absolute() and (record["height"], record["width"]) == (16, 20)


def test_tampered_image_without_mask_is_a_warning(user_dataset):
    root, records = user_dataset
    records["val"][1]["mask_path"] = None
    manifest = validate_dataset(_write_split_files(root, records))
    assert len(manifest["warnings"]) == 1 and "val.json: record 1" in manifest["warnings"][0]
    assert manifest["splits"]["val"]["records"][1]["mask_path"] is None
    assert manifest["splits"]["val"]["with_mask"] == 1


def _corrupt(root, records, case):
    train = records["train"]
    if case == "label":
        train[0]["label"] = 2
    elif case == "missing_image":
        train[0]["image_path"] = "img/nowhere.png"
    elif case == "unreadable_image":
        (root / "img/broken.png").write_text("not a png")
        train[0]["image_path"] = "img/broken.png"
    elif case == "mask_size":
        Image.new("L", (8, 8)).save(root / "img/small_mask.png")
        train[1]["mask_path"] = "img/small_mask.png"
    elif case == "zero_mask_size":
        train[0]["mask_path"] = "20x16"
    elif case == "empty_split":
        records["test"] = []
    elif case == "duplicate":
        train.append(dict(train[0]))
    elif case == "duplicate_across_splits":
        records["val"].append(dict(train[0]))
    elif case == "not_a_list":
        records["train"] = {"image_path": "x"}
    elif case == "not_a_record":
        train.append("img/train_0.png")


@pytest.mark.parametrize(
    "case, message",
    [
        ("label", r"train\.json: record 0: 'label' must be 0 \(real\) or 1 \(tampered\), got 2"),
        ("missing_image", r"train\.json: record 0: image .*nowhere\.png does not exist"),
        ("unreadable_image", r"train\.json: record 0: image .*broken\.png is unreadable"),
        ("mask_size", r"train\.json: record 1: mask .*small_mask\.png size does not match"),
        ("zero_mask_size", r"train\.json: record 0: mask size 20x16 does not match image size 16x20"),
        ("empty_split", r"test\.json: split 'test' is empty"),
        ("duplicate", r"train\.json: image .*train_0\.png is listed twice"),
        ("duplicate_across_splits", r"val\.json: image .*train_0\.png is listed twice \(also in split 'train'\)"),
        ("not_a_list", r"train\.json: must hold a JSON list of records, got dict"),
        ("not_a_record", r"train\.json: record 2: must be an object, got str"),
    ],
)
def test_each_bad_case_has_its_own_error(user_dataset, case, message):
    root, records = user_dataset
    _corrupt(root, records, case)
    with pytest.raises(DataError, match=message) as caught:
        validate_dataset(_write_split_files(root, records))
    assert "\n" not in str(caught.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"train\.json: annotation file does not exist"):
        validate_dataset({split: tmp_path / f"{split}.json" for split in SPLITS})
